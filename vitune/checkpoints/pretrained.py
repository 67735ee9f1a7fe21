"""Pretrained components: named sources, the configs they imply, and their weights in a VLM.

A model config names its starting points with two typed fields (never by folder-name guessing):

- `ModelConfig.lm_pretrained`: a key of `LM_SOURCES` (`"smollm2-135m-instruct"`: the packaged GGUF,
  converted once and cached by hf_import) or a local HF Llama/Qwen2 folder. The LM's config and
  tokenizer come from the checkpoint (`max_seq_len` is the smaller of the config's and the checkpoint's).
- `VisionConfig.pretrained`: a key of `PACKAGE_TOWERS` (`"package:efficientnet-lite0"`) or a local
  HF CLIP/SigLIP folder (the tower's shape fields and image statistics come from the checkpoint;
  `feature_layer` stays the config's).

    build_vlm(cfg, image_token_id)  resolve the config, build the VLM and load the pretrained weights
    base_state(cfg, parts)          the pretrained tensors of those parts, keyed like VLM.state_dict()
    pretrained_tokenizer(cfg)       the pretrained LM's tokenizer (with `<image>` added)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from vitune.checkpoints.hf_import import convert_smollm2, load_hf_lm, load_hf_vision
from vitune.config import ModelConfig, VisionConfig
from vitune.data.tokenizer import Tokenizer
from vitune.model.efficientnet import PACKAGE_TOWERS
from vitune.model.vision import build_vision
from vitune.model.vlm import VLM

LM_SOURCES: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": lambda: convert_smollm2()}
State = dict[str, torch.Tensor]


def lm_folder(source: str) -> Path:
    """The HF folder behind `ModelConfig.lm_pretrained`."""
    if source in LM_SOURCES:
        return LM_SOURCES[source]()
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.lm_pretrained={source!r}: neither a known source {sorted(LM_SOURCES)} "
                                f"nor a local Hugging Face folder with a config.json")
    return path


def pretrained_tokenizer(cfg: ModelConfig) -> Tokenizer:
    return Tokenizer.load(lm_folder(cfg.lm_pretrained))


def _vision(v: VisionConfig) -> tuple[torch.nn.Module, VisionConfig]:
    """(tower with pretrained weights, its resolved config)."""
    if v.pretrained in PACKAGE_TOWERS:
        kind, load = PACKAGE_TOWERS[v.pretrained]
        if v.kind != kind:
            raise ValueError(f"model.vision.pretrained={v.pretrained!r} needs model.vision.kind={kind!r}, got {v.kind!r}")
        tower = build_vision(v)
        load(tower)
        return tower, v
    if not (Path(v.pretrained) / "config.json").is_file():
        raise FileNotFoundError(f"model.vision.pretrained={v.pretrained!r}: neither a known source "
                                f"{sorted(PACKAGE_TOWERS)} nor a local CLIP/SigLIP folder with a config.json")
    if v.kind != "vit":
        raise ValueError(f"model.vision.pretrained={v.pretrained!r} is a Hugging Face tower: needs kind='vit'")
    vit, vcfg = load_hf_vision(v.pretrained, v.feature_layer)
    return vit, replace(vcfg, pretrained=v.pretrained)


def resolve_and_load(cfg: ModelConfig, parts: tuple[str, ...] = ("vision", "lm")) -> tuple[ModelConfig, dict[str, State]]:
    """The config with the pretrained parts' fields filled in, and their state dicts by part."""
    states: dict[str, State] = {}
    if cfg.lm_pretrained and "lm" in parts:
        lm, _ = load_hf_lm(lm_folder(cfg.lm_pretrained))
        cfg = replace(cfg, lm=replace(lm.cfg, max_seq_len=min(cfg.lm.max_seq_len, lm.cfg.max_seq_len)))
        states["lm"] = lm.state_dict()
    if cfg.vision.pretrained and "vision" in parts:
        tower, vcfg = _vision(cfg.vision)
        cfg = replace(cfg, vision=vcfg)
        states["vision"] = tower.state_dict()
    return cfg, states


def pretrained_parts(cfg: ModelConfig) -> tuple[str, ...]:
    """The parts whose weights start from a pretrained source."""
    return tuple(p for p, src in (("vision", cfg.vision.pretrained), ("lm", cfg.lm_pretrained)) if src)


def prefixed(states: dict[str, State]) -> State:
    return {f"{part}.{k}": v for part, st in states.items() for k, v in st.items()}


def base_state(cfg: ModelConfig, parts: tuple[str, ...]) -> State:
    return prefixed(resolve_and_load(cfg, parts)[1])


def build_vlm(cfg: ModelConfig, image_token_id: int) -> VLM:
    """A VLM with its pretrained parts loaded; the rest (connector, adapters, ...) random."""
    cfg, states = resolve_and_load(cfg)
    model = VLM(cfg, image_token_id)
    missing, unexpected = model.load_state_dict(prefixed(states), strict=False)
    stray = [k for k in missing if k.split(".", 1)[0] in states and not k.endswith(("lora_A", "lora_B"))]
    if unexpected or stray:
        raise ValueError(f"pretrained weights do not fit the model: unexpected {unexpected[:5]}, missing {stray[:5]}")
    return model

"""Presets: named, complete configs as plain builder functions (the registry is `PRESETS`).

- `tiny`  : random-init, byte tokenizer; a training step in well under a second (tests).
- `small` : the quickstart model for the built-in shapes data; trains from scratch on a CPU.

From-scratch presets train every part in both stages: with nothing pretrained, the `align`
stage (captions) must teach the vision tower and LM as well as the connector.
"""

from __future__ import annotations

from typing import Callable

from .config import (Config, ConnectorConfig, LMConfig, ModelConfig, StageConfig, TokenizerConfig,
                     TrainConfig, VisionConfig, validate)

ALL_PARTS = ("vision", "connector", "lm")


def tiny() -> Config:
    model = ModelConfig(
        vision=VisionConfig(kind="vit", image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
        connector=ConnectorConfig(reduce="none"),
        lm=LMConfig(dim=64, layers=2, heads=4, kv_heads=2, ffn_dim=128, max_seq_len=192),
        tokenizer=TokenizerConfig(kind="byte"),
    )
    stages = (
        StageConfig(name="align", template="plain", train=ALL_PARTS, steps=4, batch_size=4,
                    lr_vision=1e-3, lr_connector=1e-3, lr_lm=1e-3),
        StageConfig(name="instruct", template="chatml", train=ALL_PARTS, steps=4, batch_size=4,
                    lr_vision=1e-3, lr_connector=1e-3, lr_lm=1e-3),
    )
    return validate(Config(model, TrainConfig(stages=stages, log_every=1)))


def small() -> Config:
    model = ModelConfig(
        vision=VisionConfig(kind="vit", image_size=96, patch_size=16, width=128, layers=2, heads=4, mlp_dim=384,
                            stats_from_data=True),
        connector=ConnectorConfig(reduce="pool2x2"),
        lm=LMConfig(dim=192, layers=4, heads=6, kv_heads=2, ffn_dim=512, max_seq_len=160),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=512),
    )
    lr = dict(lr_vision=1e-3, lr_connector=1e-3, lr_lm=1e-3)
    stages = (
        StageConfig(name="align", template="plain", train=ALL_PARTS, epochs=2, batch_size=32, warmup_steps=30, **lr),
        StageConfig(name="instruct", template="chatml", train=ALL_PARTS, epochs=3, batch_size=32, warmup_steps=30, **lr),
    )
    return validate(Config(model, TrainConfig(stages=stages, precision="bf16", log_every=20)))


PRESETS: dict[str, Callable[[], Config]] = {"tiny": tiny, "small": small}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]()

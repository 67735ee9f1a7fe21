"""Presets: named, complete configs as plain builder functions (the registry is `PRESETS`).

- `tiny`  : random-init, byte tokenizer; a training step in well under a second (tests).
- `small` : the quickstart model for the built-in shapes data; trains from scratch on a CPU.
- `smol`  : pretrained parts: EfficientNet-Lite0 (ImageNet, frozen) -> MLP -> SmolLM2-135M-Instruct
            with LoRA adapters. `align` trains the projector on captions (plain template);
            `instruct` trains the projector and the adapters on chats (ChatML), mixed with text-only
            chats (`train.stages.1.mix_data=[text_chat.json]`, from `vitune data text-chat`) so the
            LM keeps its language ability. Full fine-tuning instead of LoRA:
            `train.stages.1.train=[connector,lm] model.lora.rank=0 train.stages.1.lr_lm=2e-5`.

From-scratch presets train every part in both stages: with nothing pretrained, the `align`
stage (captions) must teach the vision tower and LM as well as the connector.
"""

from __future__ import annotations

from typing import Callable

from vitune.config import (
    Config,
    ConfigError,
    ConnectorConfig,
    LMConfig,
    LoRAConfig,
    ModelConfig,
    StageConfig,
    TokenizerConfig,
    TrainConfig,
    VisionConfig,
    validate,
)

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


# SmolLM2's chat template inserts this system turn when a chat has none; so does vitune, for the
# pretrained LM to see the chats it was tuned on.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def smol() -> Config:
    model = ModelConfig(
        # 224 px -> 7 x 7 = 49 tokens of 1280-d. No 2x2 reduction: 49 tokens are already few, and a
        # 7 x 7 grid is odd (pooling would need padding to 8 x 8 and blur the 3 x 3 result).
        vision=VisionConfig(kind="efficientnet_lite0", pretrained="package:efficientnet-lite0", image_size=224,
                            patch_size=32, width=1280, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
        connector=ConnectorConfig(reduce="none"),
        lm=LMConfig(max_seq_len=512),  # the rest comes from the checkpoint
        lm_pretrained="smollm2-135m-instruct",
        # No adapter dropout: drawing its masks (210 per step) took 18 % of a CPU training step.
        lora=LoRAConfig(rank=16, alpha=32.0, dropout=0.0),
        system_prompt=SMOLLM2_SYSTEM,
    )
    stages = (
        StageConfig(name="align", template="plain", train=("connector",), epochs=1, batch_size=8,
                    lr_connector=1e-3, warmup_steps=20),
        # Packed: a row holds all of one image's questions behind one copy of the system prompt and
        # image tokens (~10 questions per row on easy-VQA, 3.8x fewer tokens than a row each), so
        # batch_size counts images: 2 x 2 accumulated (~40 questions a step; as fast as 4 x 1 on a
        # CPU, with ~1.3 GB less activation memory). mix_fraction counts records: 3 % of records is
        # ~10 % of the tokens.
        StageConfig(name="instruct", template="chatml", train=("connector", "lora"), epochs=1, batch_size=2,
                    grad_accum=2, lr_connector=2e-4, lr_lora=4e-4, warmup_steps=20, mix_fraction=0.03,
                    packing="shared_prefix"),
    )
    return validate(Config(model, TrainConfig(stages=stages, precision="bf16", log_every=20)))


PRESETS: dict[str, Callable[[], Config]] = {"tiny": tiny, "small": small, "smol": smol}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]()

"""Presets (`vitune.presets`): every preset validates, the from-scratch ones build and train a step,
and the sizes the documentation gives are what the presets build: `small` 2.169 M parameters and
9 image tokens (README, docs/performance.md); `smol` a 1.1 M projector and 4.9 M LoRA parameters on
a 134.5 M frozen LM (docs/recipes/smol-easy-vqa.md). Nothing pretrained is loaded: `smol`'s LM is
sized on the meta device with SmolLM2-135M's published shape."""

import dataclasses

import pytest
import torch

from vitune.config import ConfigError, LMConfig, apply_overrides, validate
from vitune.conventions import IGNORE_INDEX
from vitune.model.connector import build_connector
from vitune.model.lm import Block
from vitune.model.lora import apply_lora
from vitune.model.vlm import VLM
from vitune.presets import ALL_PARTS, PRESETS, preset, small, smol, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_built_fresh(name):
    cfg = preset(name)
    assert validate(cfg) == cfg == PRESETS[name]()
    assert [s.name for s in cfg.train.stages] == ["align", "instruct"]
    assert [s.template for s in cfg.train.stages] == ["plain", "chatml"]


@pytest.mark.parametrize("build", [tiny, small])
def test_from_scratch_presets_train_every_part_in_every_stage(build):
    cfg = build()
    assert not cfg.model.lm_pretrained and not cfg.model.vision.pretrained
    assert all(s.train == ALL_PARTS for s in cfg.train.stages)


def test_small_has_the_documented_size():
    model = VLM(small().model, image_token_id=511)  # vocab 512, as documented
    assert n_params(model) == 2_168_896  # "2.169 M parameters"
    assert model.n_image_tokens == 9  # 6 x 6 patches, pool2x2
    same_arch = dataclasses.replace(small().model, connector=dataclasses.replace(small().model.connector, reduce="none"))
    full = VLM(same_arch, 511)
    assert full.n_image_tokens == 36 and n_params(full) == n_params(model)  # pooling adds no parameters


def test_tiny_trains_a_step(tok):
    torch.manual_seed(0)
    cfg = tiny().model
    model = VLM(dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size)), tok.special.image)
    assert model.n_image_tokens == 16  # 32 px / patch 8, no reduction
    ids = torch.cat([torch.full((2, 16), tok.special.image), torch.randint(0, 256, (2, 10))], 1)
    labels = ids.clone()
    labels[:, :16] = IGNORE_INDEX
    loss, n = model(ids, labels, torch.randn(2, 3, 32, 32))
    loss.backward()
    assert n == 2 * 10 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


# SmolLM2-135M-Instruct's config.json (the LM fields come from the checkpoint at build time)
SMOLLM2_135M = LMConfig(vocab_size=49152, dim=576, layers=30, heads=9, kv_heads=3, ffn_dim=1536)


def test_smol_has_the_documented_adapter_and_projector_sizes():
    cfg = smol().model
    assert cfg.connector.reduce == "none" and cfg.vision.image_size // cfg.vision.patch_size == 7  # 49 tokens
    projector = build_connector(cfg.connector, cfg.vision.width, SMOLLM2_135M.dim, 49)
    assert round(n_params(projector) / 1e6, 1) == 1.1
    lm = SMOLLM2_135M
    with torch.device("meta"):  # shapes only (a whole LM on meta is slow to initialise: one block)
        block = Block(lm)
    per_block = n_params(block)
    base = lm.layers * per_block + lm.vocab_size * lm.dim + lm.dim  # tied head: embedding, blocks, final norm
    assert round(base / 1e6, 1) == 134.5
    assert apply_lora(block, cfg.lora) == 7  # q, k, v, o, gate, up, down
    assert round(lm.layers * (n_params(block) - per_block) / 1e6, 1) == 4.9


def test_smol_keeps_its_pretrained_parts_frozen():
    cfg = smol()
    assert all("vision" not in s.train and "lm" not in s.train for s in cfg.train.stages)
    assert cfg.train.stages[1].train == ("connector", "lora") and cfg.model.lora.dropout == 0.0


@pytest.mark.parametrize("build, overrides", [
    (smol, ["train.stages.1.train=[connector,lm]", "model.lora.rank=0", "train.stages.1.lr_lm=2e-5"]),  # presets.py
    (small, ["train.stages.1.steps=200", "train.precision=bf16", "model.connector.reduce=pixel_shuffle2x2"]),  # README
    (small, ["train.stages.0.epochs=4", "train.stages.1.epochs=7"]),  # README
])
def test_documented_overrides_validate(build, overrides):
    apply_overrides(build(), overrides)


@pytest.mark.parametrize("build, overrides, message", [
    (smol, ["model.connector.reduce=pool2x2"], "needs an even grid, got 7x7"),
    (smol, ["model.lora.rank=0"], "train.stages.1.train names 'lora' but model.lora.rank is 0"),
    (smol, ["model.vision.stats_from_data=true"], "stats_from_data must be false for a pretrained tower"),
    (tiny, ["model.lm.kv_heads=3"], "model.lm.heads must be a multiple of kv_heads"),
])
def test_breaking_a_preset_names_the_field(build, overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(build(), overrides)

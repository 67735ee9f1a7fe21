"""Gated cross-attention (Flamingo-style): the bare LM at init, one marker per image, text that
sees only the images before it, cached == uncached decoding, batches with text-only rows,
save / load, the resampler, training through the loop, and the refusals."""

import dataclasses

import pytest
import torch

from vitune.checkpoints.model_folder import load_pretrained, save_pretrained
from vitune.config import ConfigError, FusionConfig, apply_overrides
from vitune.inference.generate import GenerationConfig, generate
from vitune.model.vlm import VLM
from vitune.presets import tiny
from vitune.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def xattn_model(tok, every=1, latents=0, seed=0) -> VLM:
    torch.manual_seed(seed)
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, fusion=FusionConfig(kind="xattn", heads=2, xattn_every=every, latents=latents),
                              lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size))
    return VLM(cfg, tok.special.image).eval()


def open_gates(model: VLM, value: float = 0.7) -> None:
    with torch.no_grad():
        for b in model.xattn.blocks.values():
            b.attn_gate.fill_(value)
            b.mlp_gate.fill_(value)


def logits(model, ids, pixels):
    embeds, cross = model.prepare(ids, pixels)
    return model.lm.logits(model.lm(embeds, torch.arange(ids.shape[1])[None].expand_as(ids), before_layer=cross))


def prompt(tok, before: str, after: str) -> torch.Tensor:
    return torch.tensor([tok.encode(before) + [tok.special.image] + tok.encode(after)])


def test_at_init_the_logits_are_the_bare_lms(tok):
    model = xattn_model(tok)
    ids = prompt(tok, "Look: ", " what colour?")
    with torch.no_grad():
        fused = logits(model, ids, torch.randn(1, 3, 32, 32))
        embeds, _ = model.prepare(ids, torch.randn(1, 3, 32, 32))
        bare = model.lm.logits(model.lm(embeds, torch.arange(ids.shape[1])[None]))
    assert torch.equal(fused, bare)
    assert model.xattn.gates() == {0: (0.0, 0.0), 1: (0.0, 0.0)}
    assert model.n_image_tokens == 1  # the image is one marker in the sequence, not its tokens


def test_text_sees_the_image_only_after_its_marker(tok):
    model = xattn_model(tok)
    open_gates(model)
    ids = prompt(tok, "Look: ", " what colour?")
    marker = ids[0].tolist().index(tok.special.image)
    with torch.no_grad():
        a, b = logits(model, ids, torch.randn(1, 3, 32, 32)), logits(model, ids, torch.randn(1, 3, 32, 32))
    assert torch.equal(a[:, :marker], b[:, :marker])  # before the image: nothing of it
    assert (a[:, marker:] - b[:, marker:]).abs().max() > 1e-4  # from the marker on: the image matters


def test_xattn_every_and_the_resampler(tok):
    model = xattn_model(tok, every=2, latents=3)
    assert sorted(model.xattn.gates()) == [0]  # 2 decoder layers, a block before every 2nd
    with torch.no_grad():
        memory = model.encode_images(torch.randn(2, 3, 32, 32))
    assert memory.shape == (2, 3, model.cfg.lm.dim)  # 3 latents instead of the tower's 16 tokens


def test_greedy_cached_equals_uncached_and_batched_equals_single(tok):
    model = xattn_model(tok)
    open_gates(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    prompts = [tok.encode("Q: ") + [tok.special.image] + tok.encode("red?"),
               [tok.special.image] + tok.encode("Which shape is it?"),
               tok.encode("No image here")]
    pixels = torch.randn(2, 3, 32, 32)

    def run(ps, px, cache):
        return generate(model, ps, px, GenerationConfig(max_new_tokens=6, use_cache=cache), set(), tok.decode,
                        tok.special.eos).token_ids
    both = run(prompts, pixels, True)
    assert both == run(prompts, pixels, False)
    singles = [run([prompts[0]], pixels[:1], True), run([prompts[1]], pixels[1:], True), run([prompts[2]], None, True)]
    assert both == [s[0] for s in singles]
    assert len(set(map(tuple, both))) > 1  # the rows do differ: the check is not vacuous


def test_shared_prefix_is_refused(tok):
    model = xattn_model(tok)
    p = [tok.special.image] + tok.encode("a?")
    with pytest.raises(ValueError, match="shared_prefix shares image tokens"):
        generate(model, [p, p], torch.randn(1, 3, 32, 32), GenerationConfig(max_new_tokens=2), set(), tok.decode,
                 tok.special.eos, shared_prefix=1)


def test_save_load_keeps_blocks_gates_and_marker(tok, tmp_path):
    model = xattn_model(tok, latents=2)
    open_gates(model, 0.3)
    save_pretrained(model, tok, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    ids, pixels = prompt(tok, "", " colour?"), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(logits(model, ids, pixels), logits(loaded, ids, pixels))
    assert loaded.xattn.gates() == model.xattn.gates()


def test_embed_inputs_refuses_a_cross_attention_model(tok):
    with pytest.raises(ValueError, match="use prepare"):
        xattn_model(tok).embed_inputs(prompt(tok, "", "x"), torch.randn(1, 3, 32, 32))


def test_trains_and_opens_its_gates(shapes_dir, tmp_path):
    cfg = apply_overrides(tiny(), ["model.fusion.kind=xattn", "model.fusion.heads=2", "train.stages.0.steps=3",
                                   "train.stages.1.steps=2", "train.stages.0.train=[vision,fusion,connector,lm]"])
    out = train(cfg, {"align": str(shapes_dir / "align.json"), "instruct": str(shapes_dir / "instruct.json")},
                tmp_path, progress=False, log=lambda s: None).model
    model, _ = load_pretrained(out)
    assert all(a != 0 and m != 0 for a, m in model.xattn.gates().values())


@pytest.mark.parametrize("overrides, match", [
    (["model.fusion.kind=xattn", "train.stages.1.packing=shared_prefix"], r"train\.stages\.1\.packing=shared_prefix"),
    (["model.fusion.kind=xattn", "model.fusion.heads=3"], "model.lm.dim must be divisible by model.fusion.heads"),
    (["model.fusion.kind=xattn", "model.fusion.xattn_every=0"], "xattn_every must be >= 1"),
    (["model.fusion.kind=qformer", "model.fusion.heads=3"], "qformer: fusion.dim .* must be divisible by fusion.heads"),
])
def test_bad_cross_attention_configs_name_the_field(overrides, match):
    # heads only has to divide the widths the chosen fusion uses: xattn's is the LM's (64 here)
    with pytest.raises(ConfigError, match=match):
        apply_overrides(tiny(), overrides)


def test_xattn_heads_need_not_divide_the_vision_width():
    cfg = apply_overrides(tiny(), ["model.fusion.kind=xattn", "model.fusion.heads=8", "model.vision.width=36",
                                   "model.vision.heads=2"])
    assert cfg.model.fusion.heads == 8  # 64-d LM: fine, though 36 % 8 != 0

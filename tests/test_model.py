"""Model: placeholder/feature count check, loss normalisation, KV-cache and batched generation."""

import dataclasses

import pytest
import torch

from vitune.config import ConnectorConfig, VisionConfig
from vitune.data.chat import IGNORE_INDEX
from vitune.inference.generate import GenerationConfig, generate
from vitune.model.connector import ImageTokenMismatch, merge_image_embeddings, reduce_tokens
from vitune.model.vision import build_vision
from vitune.model.vlm import VLM
from vitune.presets import tiny


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size))
    return VLM(cfg, tok.special.image).eval()


def prompt(tok, model, text, n_images=1):
    return [tok.special.image] * (model.n_image_tokens * n_images) + tok.encode(text)


def test_merge_checks_counts():
    text, mask = torch.zeros(1, 6, 4), torch.tensor([[0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(ImageTokenMismatch, match="3 image placeholder tokens.*1 image.*2 tokens = 2"):
        merge_image_embeddings(text, torch.ones(1, 2, 4), mask)
    out = merge_image_embeddings(text, torch.ones(1, 3, 4), mask)
    assert out[0, 1:4].eq(1).all() and out[0, [0, 4, 5]].eq(0).all()


def test_forward_rejects_missing_images(model, tok):
    ids = torch.tensor([prompt(tok, model, "hi")])
    with pytest.raises(ImageTokenMismatch):
        model(ids, ids, None)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_vision_encoders_give_tokens(kind):
    enc = build_vision(VisionConfig(kind=kind, image_size=32, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32))
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 16, 16)


def test_token_reduction_shapes():
    x = torch.arange(2 * 16 * 3, dtype=torch.float).view(2, 16, 3)
    assert reduce_tokens(x, "pool2x2").shape == (2, 4, 3)
    ps = reduce_tokens(x, "pixel_shuffle2x2")
    assert ps.shape == (2, 4, 12)
    # the first output token holds grid cells (0,0), (0,1), (1,0), (1,1)
    assert ps[0, 0].view(4, 3)[:, 0].tolist() == [x[0, i, 0].item() for i in (0, 1, 4, 5)]
    assert torch.allclose(reduce_tokens(x, "pool2x2")[0, 0], x[0, [0, 1, 4, 5]].mean(0))


def test_loss_is_normalised_over_the_accumulated_batch(model, tok):
    torch.manual_seed(1)
    ids = torch.randint(5, 200, (4, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[1, 5:9] = IGNORE_INDEX  # rows hold different numbers of targets
    pix = torch.randn(0, 3, 32, 32)
    full, n = model(ids, labels, pix)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    a, _ = model(ids[:1], labels[:1], pix, n_targets=n)
    b, _ = model(ids[1:], labels[1:], pix, n_targets=n)
    assert torch.allclose(a + b, full, atol=1e-5)


def greedy(model, tok, prompts, pixels, use_cache, **kw):
    gen = GenerationConfig(max_new_tokens=12, use_cache=use_cache, **kw)
    return generate(model, prompts, pixels, gen, set(), tok.decode, tok.special.eos).token_ids


def test_kv_cache_generation_equals_recompute(model, tok):
    torch.manual_seed(2)
    prompts = [prompt(tok, model, "What color?"), prompt(tok, model, "Is there a long question here, yes?")]
    pixels = torch.randn(2, 3, 32, 32)
    assert greedy(model, tok, prompts, pixels, True) == greedy(model, tok, prompts, pixels, False)
    sampled = dict(temperature=1.0, top_p=0.9, seed=3)
    assert greedy(model, tok, prompts, pixels, True, **sampled) == greedy(model, tok, prompts, pixels, False, **sampled)


def test_batched_generation_equals_one_by_one(model, tok):
    torch.manual_seed(3)
    prompts = [prompt(tok, model, "a"), prompt(tok, model, "a much longer prompt than the first")]
    pixels = torch.randn(2, 3, 32, 32)
    batched = greedy(model, tok, prompts, pixels, True)
    singles = [greedy(model, tok, [p], pixels[i:i + 1], True)[0] for i, p in enumerate(prompts)]
    assert batched == singles


def test_shared_prefix_generation_equals_separate_prompts(model, tok):
    torch.manual_seed(4)
    start = prompt(tok, model, "Question: ")
    prompts = [start + tok.encode(q) for q in ("what colour?", "is it a big red circle, yes or no?", "count")]
    image = torch.randn(1, 3, 32, 32)
    separate = greedy(model, tok, prompts, image.expand(3, -1, -1, -1), True)
    gen = GenerationConfig(max_new_tokens=12)
    shared = generate(model, prompts, image, gen, set(), tok.decode, tok.special.eos, shared_prefix=len(start))
    assert shared.token_ids == separate
    with pytest.raises(ValueError, match="same 3 tokens"):  # the image tokens must lie in the prefix
        generate(model, prompts, image, gen, set(), tok.decode, tok.special.eos, shared_prefix=3)


def test_stop_tokens_stop_strings_and_streaming(model, tok):
    p = [prompt(tok, model, "x")]
    pixels = torch.randn(1, 3, 32, 32)
    free = generate(model, p, pixels, GenerationConfig(max_new_tokens=10), set(), tok.decode, 0)
    first = free.token_ids[0][0]
    stopped = generate(model, p, pixels, GenerationConfig(max_new_tokens=10), {first}, tok.decode, 0)
    assert stopped.token_ids == [[]]
    text = free.texts[0]
    if len(text) >= 3:
        cut = generate(model, p, pixels, GenerationConfig(max_new_tokens=10, stop_strings=(text[2:4],)), set(), tok.decode, 0)
        assert cut.texts[0] == text[: text.index(text[2:4])]
    pieces = []
    streamed = generate(model, p, pixels, GenerationConfig(max_new_tokens=10), set(), tok.decode, 0, on_text=pieces.append)
    assert "".join(pieces) == streamed.texts[0] == text


def test_frozen_vision_runs_without_autograd(model, tok):
    for p in model.vision.parameters():
        p.requires_grad_(False)
    try:
        out = model.encode_images(torch.randn(1, 3, 32, 32))
        assert out.requires_grad  # the connector still trains
        assert out.grad_fn is not None and "Conv" not in str(out.grad_fn.next_functions)
    finally:
        for p in model.vision.parameters():
            p.requires_grad_(True)


def test_connector_config_reduces_image_tokens(tok):
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, connector=ConnectorConfig(reduce="pixel_shuffle2x2"))
    m = VLM(cfg, tok.special.image)
    assert m.n_image_tokens == 4 and m.encode_images(torch.randn(1, 3, 32, 32)).shape == (1, 4, cfg.lm.dim)


def test_lm_with_cache_and_no_mask_is_causal_with_offset(model):
    """Prefill then one-token steps through a cache, with mask=None, equal a single full pass."""
    from vitune.model.lm import KVCache
    lm = model.lm
    torch.manual_seed(4)
    x = torch.randn(1, 7, lm.cfg.dim)
    pos = torch.arange(7)[None]
    with torch.no_grad():
        full = lm(x, pos)
        cache = KVCache.empty(lm.cfg, 1, 7, x.dtype, x.device)
        parts = [lm(x[:, :4], pos[:, :4], cache=cache), lm(x[:, 4:6], pos[:, 4:6], cache=cache),
                 lm(x[:, 6:], pos[:, 6:], cache=cache)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def _swap_cells(features: torch.Tensor, i: int, j: int) -> torch.Tensor:
    out = features.clone()
    out[:, [i, j]] = features[:, [j, i]]
    return out


@pytest.mark.parametrize("code", ["coords", "slot_embedding", None])
def test_a_cell_swap_changes_the_tokens_only_with_a_position_code(tok, code):
    """Two images whose features differ only by two cells swapped: without a position code the
    projector's tokens are the same ones, swapped; with one, they are other tokens."""
    cfg = tiny().model
    connector = ConnectorConfig(**({code: True} if code else {}))
    m = VLM(dataclasses.replace(cfg, connector=connector), tok.special.image).eval()
    feats = torch.randn(1, m.vision.num_tokens, cfg.vision.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m.connector(feats), m.connector(_swap_cells(feats, 0, 3))
    swapped_back = _swap_cells(b, 0, 3)
    if code is None:
        assert torch.allclose(swapped_back, a, atol=1e-6)
    else:
        assert (swapped_back - a)[:, [0, 3]].abs().amax() > 1e-3
        assert torch.allclose(swapped_back[:, 1:3], a[:, 1:3], atol=1e-6)  # other cells: the same tokens


def test_coords_are_each_cells_x_and_y_in_raster_order():
    from vitune.model.connector import grid_coords
    assert grid_coords(3).tolist() == [[-1, -1], [0, -1], [1, -1], [-1, 0], [0, 0], [1, 0], [-1, 1], [0, 1], [1, 1]]


def test_slot_embedding_adds_a_position_code_per_image_token(tok):
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, connector=ConnectorConfig(reduce="pool2x2", slot_embedding=True))
    m = VLM(cfg, tok.special.image)
    assert m.connector.slot_embedding.shape == (4, cfg.lm.dim)
    with torch.no_grad():
        base = m.connector.linear_2(torch.nn.functional.gelu(m.connector.linear_1(
            reduce_tokens(m.vision(torch.zeros(1, 3, 32, 32)), "pool2x2"))))
        out = m.encode_images(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(out - base, m.connector.slot_embedding[None])

"""The compiled decode step (inference/static_decode.py): the same greedy tokens as the eager path,
for plain, left-padded, shared-prefix and quantised-with-LoRA bf16 models; bad settings refused.

Each compile takes ~10-20 s here (a C++ compiler is needed: scripts/setup.sh installs g++)."""

import shutil

import pytest
import torch
from test_quant import PROMPTS, lora_vlm, quantized, tiny_vlm

from vitune.inference.generate import GenerationConfig, generate
from vitune.inference.static_decode import BLOCK, StaticDecoder, decode_step, static_length
from vitune.model.fuse import fuse_for_inference
from vitune.model.lm import KVCache
from vitune.model.quant import QuantConfig

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")]


def tokens(model, tok, prompts, compile, n=24, **kw):
    gen = GenerationConfig(max_new_tokens=n, compile=compile)
    return generate(model, prompts, None, gen, set(), tok.decode, tok.special.eos, **kw).token_ids


def test_compiled_greedy_tokens_equal_the_eager_ones_fp32_left_padded_and_shared_prefix(tok):
    model = tiny_vlm(tok, spread=0.5)  # large random weights: varied tokens, not one repeated
    prompts = [tok.encode(p) for p in PROMPTS]  # 4 rows of different lengths: left padding
    eager = tokens(model, tok, prompts, False)
    assert len({t for row in eager for t in row}) > 8
    assert tokens(model, tok, prompts, True) == eager
    shared = [tok.encode("a shared start: ") + p for p in prompts]
    P = len(tok.encode("a shared start: "))
    assert tokens(model, tok, shared, True, shared_prefix=P) == tokens(model, tok, shared, False, shared_prefix=P)


def step_logits(model, ids: list[int], feed: list[int], compile: bool) -> torch.Tensor:
    """Logits of each step after a prefill of `ids`, the tokens `feed` given (teacher-forced)."""
    T, dtype = len(ids), next(model.parameters()).dtype
    with torch.inference_mode():
        cache = KVCache.empty(model.cfg.lm, 1, static_length(T + len(feed)), dtype, "cpu")
        model.lm(model.lm.embed(torch.tensor([ids])), torch.arange(T)[None], None, cache)
        step = StaticDecoder(model.lm, cache, torch.ones(1, T, dtype=torch.bool), compile=compile)
        return torch.cat([step.step(torch.tensor([t]), torch.tensor([[T + i]])) for i, t in enumerate(feed)]).float()


@pytest.mark.parametrize("fuse", [False, True])
def test_the_compiled_step_equals_the_uncompiled_one_int4_with_lora_in_bf16(tok, fuse):
    """bf16 logits: compiled and eager kernels may round a sum differently, so near-ties may pick
    another token; the logits of each step, fed the same tokens, must agree to bf16 precision."""
    model = quantized(lora_vlm(tok, spread=0.05), QuantConfig(4, 32)).to(torch.bfloat16)
    if fuse:
        fuse_for_inference(model.lm)  # q/k/v and gate/up as one matmul each, as Assistant.load does
    ids, feed = tok.encode(PROMPTS[0]), tok.encode(" the answer is blue")
    eager, compiled = (step_logits(model, ids, feed, c) for c in (False, True))
    scale = eager.abs().max().item()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0.02 * scale)
    assert (compiled.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.8


def test_the_static_step_uncompiled_equals_the_eager_cache_step(tok):
    """decode_step itself (no compiler): the whole-cache masked attention = the sliced one."""
    model = tiny_vlm(tok, spread=0.5)
    ids = torch.tensor([tok.encode(PROMPTS[3])])
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    with torch.inference_mode():
        eager, static = (KVCache.empty(model.cfg.lm, 1, n, torch.float32, "cpu") for n in (T + 1, static_length(T + 1)))
        for cache in (eager, static):
            model.lm(model.lm.embed(ids), pos, None, cache)
        nxt = torch.tensor([[7]])
        want = model.lm.logits(model.lm(model.lm.embed(nxt), pos[:, -1:] + 1, None, eager)[:, -1])
        got = StaticDecoder(model.lm, static, torch.ones(1, T, dtype=torch.bool), compile=False).step(
            nxt[:, 0], pos[:, -1:] + 1)
    assert torch.allclose(got, want, atol=1e-5)
    assert static.k[0].shape[2] == BLOCK and decode_step is not None


def test_bad_settings_are_refused(tok):
    with pytest.raises(ValueError, match="compile must be True or False, and needs use_cache=True"):
        GenerationConfig(compile=True, use_cache=False)
    with pytest.raises(ValueError, match="compile must be True or False"):
        GenerationConfig(compile="yes")
    from test_cross_attention import xattn_model
    model = xattn_model(tok)
    with pytest.raises(ValueError, match="no gated cross-attention .model.fusion.kind=xattn."):
        tokens(model, tok, [tok.encode("hi")], True, n=4)


def test_a_full_static_cache_is_refused(tok):
    model = tiny_vlm(tok)
    cache = KVCache.empty(model.cfg.lm, 1, 2, torch.float32, "cpu")
    cache.length = 2
    step = StaticDecoder(model.lm, cache, torch.ones(1, 2, dtype=torch.bool), compile=False)
    with pytest.raises(ValueError, match="KV cache full: 3 > 2 positions"):
        step.step(torch.tensor([1]), torch.tensor([[2]]))

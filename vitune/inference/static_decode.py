"""A decode step of fixed shapes, for `torch.compile`: `generate(..., GenerationConfig(compile=True))`.

Eager decoding spends most of a step on Python and dispatch, not on arithmetic: SmolLM2-135M runs
~2,700 small ops a token (docs/performance.md). Compiled, the step is one generated C++/Triton
function around the matmul kernels. To compile once and not at every step, nothing in it may
change shape as the answer grows:

- the KV cache is preallocated for the whole answer, its length rounded up to `BLOCK` positions
  (so calls with similar lengths share a compiled step), and written at a position held in a
  tensor (`index_copy_`), not at a Python slice;
- attention runs over all of the cache's positions under a key mask (filled and valid), not over
  a growing slice;
- the step returns the last position's logits only.

torch.compile specialises on the first shapes it sees and, at the second (batch size, cache
length) it meets, recompiles once with dynamic sizes. A compile takes tens of seconds on a small
CPU; it pays off over long answers or many requests (bench/bench_decode.py measures both).
Gated cross-attention models (fusion.kind=cross_attention) are refused: their per-layer hook is
not part of this step.
"""

from __future__ import annotations

import torch

from vitune.model.lm import LM, KVCache, rope_tables

BLOCK = 128  # cache lengths are rounded up to a multiple of this
RECOMPILE_LIMIT = 64


def static_length(needed: int) -> int:
    return -(-needed // BLOCK) * BLOCK


class StaticKVCache:
    """`KVCache`'s buffers, written at `pos` (a `(1,)` long tensor) and read whole."""

    def __init__(self, cache: KVCache, pos: torch.Tensor):
        self.k, self.v, self.pos = cache.k, cache.v, pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.pos, k)  # k (B, H_kv, 1, hd) at position pos
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer], self.v[layer]  # (B, H_kv, T_max, hd)


def decode_step(lm: LM, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                key_mask: torch.Tensor) -> torch.Tensor:
    """`tokens (B, 1)` at `positions (B, 1)`, cache slot `cache.pos`; `key_mask (B, 1, 1, T_max)` True
    where a key may be attended -> logits `(B, V)` of the next token."""
    hd = lm.cfg.head_dim or lm.cfg.dim // lm.cfg.heads
    cos, sin = rope_tables(hd, lm.cfg.rope_theta, positions)
    x = lm.embed(tokens)
    for i, layer in enumerate(lm.layers):
        x = layer(x, cos, sin, key_mask, cache, i)
    return lm.logits(lm.norm(x)[:, -1])


_COMPILED: list = []


def compiled_step():
    """`decode_step` under `torch.compile` (made once per process; it recompiles per model and shape)."""
    if not _COMPILED:
        # each model (and batch size / cache length, until sizes go dynamic) compiles its own step;
        # past dynamo's default limit of 8 a process would fall back to eager without a word
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED.append(torch.compile(decode_step, fullgraph=True))
    return _COMPILED[0]


class StaticDecoder:
    """Steps after the prefill: `step(tokens (B,), positions (B, 1)) -> logits (B, V)`.

    `cache` holds the prefill's `length` positions in buffers of `static_length(...)`;
    `valid (B, length)` says which of them are real (not left padding)."""

    def __init__(self, lm: LM, cache: KVCache, valid: torch.Tensor, compile: bool = True):
        B, T_max = cache.k[0].shape[0], cache.k[0].shape[2]
        self.lm, self.length, self.T_max = lm, cache.length, T_max
        self.pos = torch.tensor([cache.length], device=valid.device)
        self.cache = StaticKVCache(cache, self.pos)
        self.key_mask = torch.zeros(B, 1, 1, T_max, dtype=torch.bool, device=valid.device)
        self.key_mask[:, 0, 0, :cache.length] = valid
        self.fn = compiled_step() if compile else decode_step

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.length >= self.T_max:
            raise ValueError(f"KV cache full: {self.length + 1} > {self.T_max} positions")
        self.pos.fill_(self.length)
        self.key_mask[:, 0, 0, self.length] = True
        self.length += 1
        return self.fn(self.lm, self.cache, tokens[:, None], positions, self.key_mask)

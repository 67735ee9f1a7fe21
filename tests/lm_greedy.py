"""Test helper: greedy continuation of a bare vitune `LM` through its KV cache (prefill once,
then one token per step), the reference the HF-parity tests compare with `generate`."""

from __future__ import annotations

import torch

from vitune.model.lm import LM, KVCache


@torch.inference_mode()
def greedy_continue(lm: LM, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """`input_ids (B, T)` (no padding) -> the `(B, max_new_tokens)` greedy continuation."""
    B, T = input_ids.shape
    w = lm.embed_tokens.weight
    cache = KVCache.empty(lm.cfg, B, T + max_new_tokens, w.dtype, w.device)
    positions = torch.arange(T, device=w.device).expand(B, T)
    hidden = lm(lm.embed(input_ids), positions, cache=cache)  # (B, T, D)
    out = []
    for step in range(max_new_tokens):
        token = lm.logits(hidden[:, -1]).argmax(-1)  # (B,)
        out.append(token)
        pos = torch.full((B, 1), T + step, device=w.device)
        # An explicit all-keys mask: with mask=None SDPA's is_causal aligns a 1-token query
        # top-left, i.e. to the first cached key only.
        see_all = torch.ones(B, 1, 1, T + step + 1, dtype=torch.bool, device=w.device)
        hidden = lm(lm.embed(token[:, None]), pos, see_all, cache)  # (B, 1, D)
    return torch.stack(out, dim=1)

"""Attention helpers shared by every block of the model: fp32 attention under autocast, and the
masks and positions of rows packed behind a shared prefix (`vitune.data.packing` builds the
segment ids; `vitune.conventions` numbers them).
"""

from __future__ import annotations

import torch

from vitune.conventions import PREFIX_SEGMENT


def fp32_attention(x: torch.Tensor):
    """Attention in fp32, also under bf16 autocast (which would cast SDPA back to bf16): on CPU
    bf16 SDPA is several times slower than fp32 (docs/performance.md) and less exact."""
    return torch.autocast(x.device.type, enabled=False)


def attention_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`segments (B, T)` -> (`positions (B, T)`, `mask (B, 1, T, T)` bool, True = may attend).

    A token attends causally to the shared prefix (segment 0) and to its own segment; each segment
    after the prefix restarts its positions where the prefix ends. Padding (segment -1) is a
    segment like the others: it never reaches real tokens' outputs.
    """
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device).expand(B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    to_prefix = (segments == PREFIX_SEGMENT)[:, None, :]
    mask = causal & (same | to_prefix)
    prefix_len = (segments == PREFIX_SEGMENT).sum(1, keepdim=True)  # the prefix is the rows' start
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    seg_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    positions = torch.where(segments == PREFIX_SEGMENT, idx, prefix_len + idx - seg_start)
    return positions, mask[:, None]

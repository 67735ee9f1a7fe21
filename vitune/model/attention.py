"""Attention shared by every block of the model: one multi-head attention (self and cross, with
key masks and optional weights), fp32 attention under autocast, and the masks and positions of
rows packed behind a shared prefix (`vitune.data.packing` builds the segment ids;
`vitune.conventions` numbers them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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


class MultiHeadAttention(nn.Module):
    """Multi-head attention, self or cross, computed in fp32 (see `fp32_attention`); the one
    implementation the vision tower, the fusions and the Q-Former share.

        x (B, N, D) attends to kv (B, M, D_kv) (default: x itself) -> (B, N, D)
        key_mask (B, M) bool, True = may be attended; `need_weights` also returns (B, H, N, M).

    Parameter names follow CLIP's (`q_proj`, `k_proj`, `v_proj`, `out_proj`), so CLIP/SigLIP
    towers load into it key by key.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_proj, self.v_proj = nn.Linear(kv_dim or dim, dim), nn.Linear(kv_dim or dim, dim)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`kv (B, M, D_kv)` -> keys, values `(B, H, M, hd)`: computed once, attended many times."""
        B, M, _ = kv.shape
        return tuple(p(kv).view(B, M, self.heads, -1).transpose(1, 2) for p in (self.k_proj, self.v_proj))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`x (B, N, D)` against projected keys/values; `mask` bool, broadcastable to (B, H, N, M)."""
        B, N, D = x.shape
        q = self.q_proj(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, H, N, hd)
        with fp32_attention(x):
            q, k, v = q.float(), k.float(), v.float()
            if need_weights:
                scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, M)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = scores.softmax(-1)
                y = weights @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(y.to(x.dtype).transpose(1, 2).reshape(B, N, D))
        return (out, weights) if need_weights else out

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        k, v = self.project_kv(x if kv is None else kv)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
        return self.attend(x, k, v, mask, need_weights)

"""Flamingo-style gated cross-attention: the image enters the LM through cross-attention blocks,
not through its sequence (`model.fusion.kind=xattn`).

    tower features (n_img, N, D_v) -> [Resampler: `latents` learned queries] -> connector -> memory (n_img, M, D_lm)
    before every `xattn_every`-th decoder layer:  x <- x + tanh(a) * attn(norm(x), memory)
                                                  x <- x + tanh(b) * mlp(norm(x))
    a = b = 0 at init: the model starts as the bare LM (the image's one marker token aside).

Each image keeps one marker position in the sequence (`<image>` -> 1 token, a learned
embedding); a text token attends to the images whose marker precedes it (or is it), so
several images per row and text-only rows work. `CrossContext` holds each block's visual keys
and values, projected once per image: generation computes them at the prompt and reuses them at
every decoding step (the visual KV cache).
"""

from __future__ import annotations

import torch
from torch import nn

from vitune.config import FusionConfig
from vitune.model.attention import MultiHeadAttention


class Resampler(nn.Module):
    """Perceiver-style: `latents` learned queries cross-attend to the tower features -> (n, K, D_v)."""

    def __init__(self, dim: int, heads: int, latents: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        q = self.latents.to(features.dtype).expand(features.shape[0], -1, -1)  # (n, K, D)
        x = q + self.attn(self.norm_q(q), self.norm_kv(features))
        return x + self.mlp(self.norm_mlp(x))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_attn, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        """`x (B, T, D)`, projected memory `kv`, `visible (B, T, S)` bool -> x."""
        anything = visible.any(-1, keepdim=True)  # (B, T, 1): a token before every image sees none
        mask = (visible | ~anything)[:, None]  # (B, 1, T, S); fully masked rows attend anywhere, zeroed below
        seen = anything.to(x.dtype)
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.attn.attend(self.norm_attn(x), *kv, mask) * seen
        return x + torch.tanh(self.mlp_gate).to(x.dtype) * self.mlp(self.norm_mlp(x)) * seen


class GatedCrossAttention(nn.Module):
    """The blocks (one before every `xattn_every`-th decoder layer), the marker embedding and the
    optional resampler."""

    def __init__(self, cfg: FusionConfig, vision_dim: int, lm_dim: int, lm_layers: int):
        super().__init__()
        self.cfg = cfg
        self.layers = [i for i in range(lm_layers) if i % cfg.xattn_every == 0]
        self.blocks = nn.ModuleDict({str(i): GatedCrossAttentionBlock(lm_dim, cfg.heads) for i in self.layers})
        self.marker = nn.Parameter(torch.randn(lm_dim) * 0.02)
        self.resampler = Resampler(vision_dim, cfg.heads, cfg.latents) if cfg.latents else None

    def num_memory_tokens(self, n_vision_tokens: int) -> int:
        return self.cfg.latents or n_vision_tokens

    def gates(self) -> dict[int, tuple[float, float]]:
        """tanh of each block's (attention, MLP) gate: how much of the image each layer lets in."""
        return {i: (torch.tanh(b.attn_gate).item(), torch.tanh(b.mlp_gate).item())
                for i, b in ((int(k), v) for k, v in self.blocks.items())}

    def context(self, memory: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                positions: torch.Tensor) -> CrossContext:
        """`memory (n_img, M, D)` in batch order -> each row's images, their markers' positions."""
        B = input_ids.shape[0]
        rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)  # row-major = image order
        if len(rows) != memory.shape[0]:
            raise ValueError(f"{len(rows)} image markers in the batch but {memory.shape[0]} image(s)")
        per_row = torch.bincount(rows, minlength=B)
        n_max, M = int(per_row.max()) if len(rows) else 0, memory.shape[1]
        slot = torch.arange(len(rows), device=rows.device) - (per_row.cumsum(0) - per_row)[rows]  # image's index in its row
        mem = memory.new_zeros(B, max(n_max, 1), M, memory.shape[-1])
        mem[rows, slot] = memory
        key_pos = torch.full((B, max(n_max, 1)), -1, dtype=torch.long, device=input_ids.device)
        key_pos[rows, slot] = positions[rows, cols]
        mem, key_pos = mem.flatten(1, 2), key_pos.repeat_interleave(M, dim=1)  # (B, S, D), (B, S)
        kv = {i: self.blocks[str(i)].attn.project_kv(mem) for i in self.layers}
        return CrossContext(self, kv, key_pos)


class CrossContext:
    """What the LM needs to cross-attend: each block's projected visual keys/values (computed
    once) and the position of each key's image marker. Called before every decoder layer."""

    def __init__(self, module: GatedCrossAttention, kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 key_pos: torch.Tensor):
        self.module, self.kv, self.key_pos = module, kv, key_pos

    def __call__(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if layer not in self.kv:
            return x
        visible = (self.key_pos[:, None, :] >= 0) & (self.key_pos[:, None, :] <= positions[:, :, None])  # (B, T, S)
        return self.module.blocks[str(layer)](x, self.kv[layer], visible)

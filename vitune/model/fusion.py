"""Fusion: the instruction shapes what the LM sees of the image (`FusionConfig.kind`).

    instruction ids (n_img, L) -> InstructionEncoder -> hidden (n_img, L, D_t), z (n_img, D_t)
    film   : z -> FiLMGenerator -> (gamma, beta) per tower layer; the tower runs modulated
    qformer: K queries + instruction hidden (self-attention), queries -> image (cross-attention)
             -> (n_img, K, D_q): the image tokens

`Fusion.encode(vision, pixel_values, ids, mask)` returns the features the connector projects, so
the VLM calls one function whichever fusion it has. The projector (`kind=projector`) has no
`Fusion` module at all: its image tokens ignore the instruction.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from vitune.config import FusionConfig
from vitune.model.attention import MultiHeadAttention
from vitune.model.text_encoder import TextEncoder, mean_pool
from vitune.model.vision import Modulation, sincos_2d


class InstructionEncoder(nn.Module):
    """z = g(t): a BERT-family encoder over the instruction's tokens; mean-pooled over real tokens."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.encoder = TextEncoder(replace(cfg.text, normalize=False))
        self.vocab_size = cfg.text.vocab_size

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`ids, mask (n, L)` -> (hidden `(n, L, D_t)`, z `(n, D_t)`)."""
        hidden = self.encoder(ids.clamp(max=self.vocab_size - 1), mask)
        return hidden, mean_pool(hidden, mask)


class FiLMGenerator(nn.Module):
    """z -> one (gamma, beta) pair per modulated layer; gamma = 1 and beta = 0 at init (the weights
    start at zero), so the modulated tower starts as the unconditioned one."""

    def __init__(self, z_dim: int, widths: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(z_dim, 2 * w) for w in widths)
        for head, w in zip(self.heads, widths):
            nn.init.zeros_(head.weight)
            with torch.no_grad():
                head.bias.copy_(torch.cat([torch.ones(w), torch.zeros(w)]))

    def forward(self, z: torch.Tensor) -> Modulation:
        return [tuple(head(z).chunk(2, dim=-1)) for head in self.heads]  # each (n, C), (n, C)


class QFormerBlock(nn.Module):
    """Pre-norm: [queries; instruction] self-attention, queries -> image cross-attention, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, heads)
        self.cross_attn = MultiHeadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, n_queries: int, x_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), key_mask=x_mask)  # (n, K + L, D)
        q, text = x[:, :n_queries], x[:, n_queries:]
        x = torch.cat([q + self.cross_attn(self.norm2(q), image), text], dim=1)
        return x + self.mlp(self.norm3(x))


class InstructionQFormer(nn.Module):
    """InstructBLIP's instruction-aware Q-Former, from scratch: K queries read the image as the
    instruction directs them. Image features get a fixed 2-D position code (square grids)."""

    def __init__(self, cfg: FusionConfig, vision_dim: int, text_dim: int, n_vision_tokens: int):
        super().__init__()
        dim = cfg.dim or vision_dim
        self.queries = nn.Parameter(torch.randn(cfg.queries, dim) * 0.02)  # (K, D)
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(vision_dim, dim)
        grid = math.isqrt(n_vision_tokens)
        pos = sincos_2d(grid, dim) if grid * grid == n_vision_tokens and dim % 4 == 0 else torch.zeros(n_vision_tokens, dim)
        self.register_buffer("image_pos", pos, persistent=False)  # (N, D)
        self.blocks = nn.ModuleList(QFormerBlock(dim, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """`image (n, N, D_v)`, `text (n, L, D_t)`, `text_mask (n, L)` -> `(n, K, D)`."""
        n, K = image.shape[0], self.queries.shape[0]
        image = self.image_proj(image) + self.image_pos.to(image.dtype)  # (n, N, D)
        q = self.queries.to(image.dtype).expand(n, -1, -1)
        x = torch.cat([q, self.text_proj(text).to(image.dtype)], dim=1)  # (n, K + L, D)
        x_mask = torch.cat([torch.ones(n, K, dtype=torch.bool, device=image.device), text_mask.bool()], dim=1)
        for block in self.blocks:
            x = block(x, K, x_mask, image)
        return self.norm(x[:, :K])


class Fusion(nn.Module):
    """The instruction encoder plus the fusion of `cfg.kind` (film or qformer)."""

    def __init__(self, cfg: FusionConfig, vision: nn.Module, vision_dim: int):
        super().__init__()
        if not cfg.needs_instruction:
            raise ValueError("model.fusion.kind=projector has no fusion module")
        self.cfg = cfg
        self.instruction = InstructionEncoder(cfg)
        self.film = FiLMGenerator(cfg.text.dim, vision.film_widths(cfg.film_every)) if cfg.kind == "film" else None
        self.qformer = InstructionQFormer(cfg, vision_dim, cfg.text.dim, vision.num_tokens) \
            if cfg.kind == "qformer" else None

    def num_tokens(self, n_vision_tokens: int) -> int:
        return self.cfg.queries if self.qformer is not None else n_vision_tokens

    def out_dim(self, vision_dim: int) -> int:
        return (self.cfg.dim or vision_dim) if self.qformer is not None else vision_dim

    def encode(self, vision: nn.Module, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
               tower_grad: bool) -> torch.Tensor:
        """Image features conditioned on each image's instruction: `(n_img, N', D')`."""
        hidden, z = self.instruction(ids, mask)  # (n, L, D_t), (n, D_t)
        if self.film is not None:  # gradients reach the FiLM heads through the tower, frozen or not
            return vision(pixel_values, self.film(z), self.cfg.film_every)
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_grad):
            features = vision(pixel_values)  # (n, N, D_v)
        return self.qformer(features, hidden, mask)


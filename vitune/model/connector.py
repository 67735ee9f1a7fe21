"""Connector: how image features reach the LM, and the merge of image embeddings into the sequence.

- `MLPProjector`: LLaVA's 2-layer MLP (`D_v -> D_lm`), optionally reducing the number of image
  tokens first: `pool2x2` averages each 2x2 block of the grid; `pixel_shuffle2x2` concatenates it
  (4 * D_v channels), both giving N / 4 tokens. Two optional 2-D position codes: `coords`
  appends each cell's (x, y) to its features before the MLP, `slot_embedding` adds a learned
  embedding per token slot (sin-cos initialised) after it; both need a square grid.
- `merge_image_embeddings`: the one place that puts image embeddings at placeholder positions,
  and refuses when their counts differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitune.config import ConnectorConfig
from vitune.model.vision import sincos_2d


def reduce_tokens(x: torch.Tensor, mode: str) -> torch.Tensor:
    """`(B, N, D)` on a square grid -> `(B, N/4, D)` (pool) or `(B, N/4, 4D)` (pixel shuffle)."""
    if mode == "none":
        return x
    B, N, D = x.shape
    g = math.isqrt(N)
    grid = x.view(B, g, g, D)
    if mode == "pool2x2":
        return F.avg_pool2d(grid.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)  # (B, N/4, D)
    if mode == "pixel_shuffle2x2":
        grid = grid.view(B, g // 2, 2, g // 2, 2, D).permute(0, 1, 3, 2, 4, 5)  # (B, g/2, g/2, 2, 2, D)
        return grid.reshape(B, (g // 2) ** 2, 4 * D)
    raise ValueError(f"unknown token reduction {mode!r}; valid: none, pool2x2, pixel_shuffle2x2")


def grid_coords(grid: int) -> torch.Tensor:
    """`(grid * grid, 2)`: each cell's (x, y) in [-1, 1], raster order (x along a row)."""
    axis = torch.linspace(-1.0, 1.0, grid) if grid > 1 else torch.zeros(1)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


def _square_grid(n_tokens: int, field: str) -> int:
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens:
        raise ValueError(f"model.connector.{field}=true needs a square grid of image tokens; "
                         f"the tower and model.connector.reduce give {n_tokens}")
    return grid


class MLPProjector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, n_vision_tokens: int):
        super().__init__()
        self.reduce = cfg.reduce
        n_tokens = self.num_tokens(n_vision_tokens)
        d_in = vision_dim * (4 if cfg.reduce == "pixel_shuffle2x2" else 1) + 2 * cfg.coords
        hidden = cfg.hidden_dim or lm_dim
        self.linear_1, self.linear_2 = nn.Linear(d_in, hidden), nn.Linear(hidden, lm_dim)
        # (N', 2), a constant of the config (saved with the model): not in the state dict
        coords = grid_coords(_square_grid(n_tokens, "coords")) if cfg.coords else None
        self.register_buffer("coords", coords, persistent=False)
        self.slot_embedding = None
        if cfg.slot_embedding:
            grid = _square_grid(n_tokens, "slot_embedding")
            self.slot_embedding = nn.Parameter(0.3 * sincos_2d(grid, lm_dim))  # (N', D_lm)

    def num_tokens(self, n_vision_tokens: int) -> int:
        return n_vision_tokens if self.reduce == "none" else n_vision_tokens // 4

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = reduce_tokens(features, self.reduce)
        if self.coords is not None:
            x = torch.cat([x, self.coords.to(x.dtype).expand(x.shape[0], -1, -1)], dim=-1)
        x = self.linear_2(F.gelu(self.linear_1(x)))  # (B, N', D_lm)
        return x if self.slot_embedding is None else x + self.slot_embedding.to(x.dtype)


CONNECTORS: dict[str, type[nn.Module]] = {"mlp": MLPProjector}


def build_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int, n_vision_tokens: int) -> nn.Module:
    if cfg.kind not in CONNECTORS:
        raise ValueError(f"unknown connector {cfg.kind!r}; valid: {sorted(CONNECTORS)}")
    return CONNECTORS[cfg.kind](cfg, vision_dim, lm_dim, n_vision_tokens)


class ImageTokenMismatch(ValueError):
    """The number of image placeholders differs from the number of image embeddings."""


def merge_image_embeddings(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, image_mask: torch.Tensor
) -> torch.Tensor:
    """Put `image_embeds (n_img, N, D)` at the True positions of `image_mask (B, T)` in order."""
    n_slots, n_feats = int(image_mask.sum()), image_embeds.shape[0] * image_embeds.shape[1]
    if n_slots != n_feats:
        raise ImageTokenMismatch(
            f"{n_slots} image placeholder tokens in the batch but {image_embeds.shape[0]} image(s) x "
            f"{image_embeds.shape[1]} tokens = {n_feats} image embeddings"
        )
    if n_slots == 0:
        return text_embeds
    out = text_embeds.clone()
    out[image_mask] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(out.dtype)
    return out

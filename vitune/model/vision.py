"""Vision encoders: `pixel_values [B, 3, H, W] -> features [B, N, D_v]`.

- `ViT`: patch embedding + pre-norm transformer blocks. Parameters follow the layout of
  CLIP / SigLIP vision towers (optional class token and pre-norm, q/k/v/out projections with
  bias, fc1/fc2 MLP) so their weights map onto it key by key (see checkpoints/hf_import.py).
- `CNN`: a small strided conv stack with a learned 2-D position embedding, for from-scratch use.
- `EfficientNetLite0` (efficientnet.py): the packaged ImageNet CNN, 49 tokens of 1280-d.

`build_vision` picks one by `VisionConfig.kind` from the explicit `VISION_ENCODERS` registry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitune.config import VisionConfig
from vitune.model.attention import MultiHeadAttention
from vitune.model.efficientnet import EfficientNetLite0

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": lambda: _QuickGELU(),
}


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """`(grid*grid, dim)` fixed 2-D sine-cosine position codes (row-major), values in [-1, 1].

    Used to initialise learned position embeddings: a from-scratch tower then knows where each
    patch is from step 0, which is what grounding a word like "left" needs.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = [f(c.reshape(-1, 1) * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)  # (grid*grid, dim)


# FiLM parameters for a tower: one (gamma, beta) pair per modulated layer, each (B, C).
Modulation = list[tuple[torch.Tensor, torch.Tensor]]


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, cfg.width)
        self.act = ACTIVATIONS[cfg.act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.self_attn = MultiHeadAttention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        n_pos = self.grid**2 + int(cfg.class_token)
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=not cfg.class_token)
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * 0.02) if cfg.class_token else None
        self.position_embedding = nn.Embedding(n_pos, cfg.width)
        with torch.no_grad():
            self.position_embedding.weight.normal_(std=0.02)
            self.position_embedding.weight[n_pos - self.grid**2:] += sincos_2d(self.grid, cfg.width)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def n_blocks(self) -> int:
        """Blocks that run: hidden_states = [embeddings, block 1, ..., block L], indexed like HF's."""
        return self.cfg.feature_layer % (len(self.layers) + 1)

    def film_widths(self, every: int) -> list[int]:
        """Channels of each layer FiLM modulates: the output of every `every`-th running block."""
        return [self.cfg.width for i in range(self.n_blocks()) if (i + 1) % every == 0]

    def forward(self, pixel_values: torch.Tensor, film: Modulation | None = None, every: int = 1) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D_v)
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D_v)
        x = self.pre_layrnorm(x + self.position_embedding.weight.to(x.dtype))
        mods = iter(film or ())
        for i, block in enumerate(self.layers[: self.n_blocks()]):
            x = block(x)
            if film is not None and (i + 1) % every == 0:
                gamma, beta = next(mods)  # (B, D_v) each
                x = gamma[:, None].to(x.dtype) * x + beta[:, None].to(x.dtype)
        return x[:, 1:] if self.class_embedding is not None else x  # (B, N, D_v)


class CNN(nn.Module):
    """Strided 3x3 convs (each halving the side) up to `patch_size` total stride, then 1x1 to D_v."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        n_down = int(math.log2(cfg.patch_size))
        if 2**n_down != cfg.patch_size:
            raise ValueError(f"model.vision.patch_size must be a power of two for the CNN, got {cfg.patch_size}")
        self.chans = [3] + [min(cfg.width, 32 * 2**i) for i in range(n_down)]
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(1, cout))
                                    for cin, cout in zip(self.chans[:-1], self.chans[1:]))
        self.out = nn.Conv2d(self.chans[-1], cfg.width, 1)
        self.grid = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Parameter(sincos_2d(self.grid, cfg.width))

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def film_widths(self, every: int) -> list[int]:
        """Channels of each block FiLM modulates (after its norm, before the activation)."""
        return [c for i, c in enumerate(self.chans[1:]) if (i + 1) % every == 0]

    def forward(self, pixel_values: torch.Tensor, film: Modulation | None = None, every: int = 1) -> torch.Tensor:
        x, mods = pixel_values, iter(film or ())
        for i, block in enumerate(self.blocks):
            x = block(x)  # (B, C, H, W)
            if film is not None and (i + 1) % every == 0:
                gamma, beta = next(mods)  # (B, C) each
                x = gamma[:, :, None, None].to(x.dtype) * x + beta[:, :, None, None].to(x.dtype)
            x = F.gelu(x)
        x = self.out(x).flatten(2).transpose(1, 2)  # (B, N, D_v)
        return x + self.position_embedding.to(x.dtype)


VISION_ENCODERS: dict[str, type[nn.Module]] = {"vit": ViT, "cnn": CNN, "efficientnet_lite0": EfficientNetLite0}


def build_vision(cfg: VisionConfig) -> nn.Module:
    if cfg.kind not in VISION_ENCODERS:
        raise ValueError(f"unknown vision encoder {cfg.kind!r}; valid: {sorted(VISION_ENCODERS)}")
    return VISION_ENCODERS[cfg.kind](cfg)

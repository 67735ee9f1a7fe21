"""Instruction-visual alignment: a dual-encoder head beside (or instead of) the LM.

    text ids (n, L)            -> TextEncoder -> mean pool -> text_proj  -> z (n, d), unit length
    tower features (n, N, D_v) -> mean pool               -> image_proj -> v (n, d), unit length
    s = cos(z, v) / tau, tau = 1 / scale learned (clamped at min_temperature); loss: losses.info_nce

Used as an auxiliary loss beside the LM loss (a stage's `contrastive_weight`), or alone
(`lm_weight=0`) for retrieval. The image side reads the tower's own features, before any
instruction conditioning: a retrieval embedding must not depend on a question.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from vitune.config import ContrastiveConfig
from vitune.model.text_encoder import TextEncoder, mean_pool


class ContrastiveHead(nn.Module):
    def __init__(self, cfg: ContrastiveConfig, vision_dim: int):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(replace(cfg.text, normalize=False))
        self.text_proj = nn.Linear(cfg.text.dim, cfg.dim, bias=False)
        self.image_proj = nn.Linear(vision_dim, cfg.dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def scale(self) -> torch.Tensor:
        """1 / tau, clamped so tau >= min_temperature (CLIP clamps the same way)."""
        return self.log_scale.clamp(max=math.log(1.0 / self.cfg.min_temperature)).exp()

    def embed_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`ids, mask (n, L)` -> `(n, d)` unit vectors."""
        hidden = self.text(ids.clamp(max=self.cfg.text.vocab_size - 1), mask)  # (n, L, D_t)
        return F.normalize(self.text_proj(mean_pool(hidden, mask)).float(), dim=-1)

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        """Tower features `(n, N, D_v)` -> `(n, d)` unit vectors."""
        return F.normalize(self.image_proj(features.mean(1)).float(), dim=-1)

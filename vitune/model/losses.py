"""Losses: the token-normalised LM loss.

`lm_loss` computes logits only at positions that have a target (cheaper than the full
`(B, T, V)` logits) and divides the summed cross-entropy by `n_targets`: the number of target
tokens in the whole accumulated batch, so gradient accumulation weighs every token equally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitune.conventions import IGNORE_INDEX


def lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor, n_targets: int | None = None
) -> tuple[torch.Tensor, int]:
    """`hidden (B, T, D)` predicts `labels (B, T)` shifted by one; returns (loss, targets here)."""
    targets = labels[:, 1:]  # (B, T-1)
    sel = targets != IGNORE_INDEX
    n_here = int(sel.sum())
    h = hidden[:, :-1][sel]  # (n_here, D)
    logits = F.linear(h, head_weight.to(h.dtype)).float()  # (n_here, V)
    loss_sum = F.cross_entropy(logits, targets[sel], reduction="sum")
    denom = n_targets if n_targets is not None else max(n_here, 1)
    return loss_sum / max(denom, 1), n_here

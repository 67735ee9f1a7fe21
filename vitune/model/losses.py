"""Losses: the token-normalised LM loss and the symmetric InfoNCE of instruction-visual alignment.

`lm_loss` computes logits only at positions that have a target (cheaper than the full
`(B, T, V)` logits) and divides the summed cross-entropy by `n_targets`: the number of target
tokens in the whole accumulated batch, so gradient accumulation weighs every token equally.

`info_nce` scores every image of a batch against every text (in-batch negatives): the mean of
the image -> text and text -> image cross-entropies, each pair's own entry the target. Rows of one
`group` (several captions of one image) are neither each other's negatives nor targets.
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


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
             groups: torch.Tensor | None = None) -> torch.Tensor:
    """`image, text (B, d)` unit vectors, pair i = (image i, text i); `scale` = 1 / temperature;
    `groups (B,)`: pairs of one image share a group. Returns the symmetric InfoNCE loss."""
    logits = scale * image.float() @ text.float().T  # (B, B): s_ij = cos(v_i, z_j) / tau
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        other = same & ~torch.eye(len(groups), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(other, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

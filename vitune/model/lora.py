"""LoRA: low-rank adapters on the LM's linear layers, and folding them back in (merge).

    y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank        A: (rank, in), B: (out, rank)

`LoRALinear` keeps the wrapped layer's parameter names (`weight`, `bias`) and adds `lora_A` and
`lora_B`, so a model with adapters has the same keys as one without, plus the adapters: pretrained
weights load into it unchanged and a model folder stores only the adapters when the base is frozen
(checkpoints/model_folder.py). `B` starts at zero, so adapters begin as the identity change.

    apply_lora(lm, cfg)   replace every target linear (by its attribute name, e.g. `q_proj`)
    merge_lora(model)     fold adapters into the weights: plain `nn.Linear`s, `cfg.lora.rank = 0`
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from vitune.config import LoRAConfig

LORA_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: pretrained values kept
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=dev))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = cfg.alpha / cfg.rank
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        a = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., rank)
        return y + F.linear(a, self.lora_B.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        """The adapters' change to `weight`: `scale * B @ A`, `(out, in)`."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def apply_lora(module: nn.Module, cfg: LoRAConfig) -> int:
    """Wrap every `nn.Linear` under `module` whose attribute name is in `cfg.targets`; returns the count."""
    if cfg.rank <= 0:
        return 0
    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if name in cfg.targets and isinstance(child, nn.Linear)]
    if not targets:
        raise ValueError(f"model.lora.targets {list(cfg.targets)} match no linear layer of the LM")
    for parent, name, child in targets:
        setattr(parent, name, LoRALinear(child, cfg))
    return len(targets)


def is_lora_key(name: str) -> bool:
    """Whether a parameter name belongs to an adapter."""
    return name.rsplit(".", 1)[-1] in LORA_KEYS


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter of a VLM into its base weights, in place; `model.cfg.lora.rank` becomes 0."""
    wrapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, LoRALinear)]
    for parent, name, child in wrapped:
        setattr(parent, name, child.merged())
    if hasattr(model, "cfg"):
        model.cfg = replace(model.cfg, lora=replace(model.cfg.lora, rank=0))
    return model

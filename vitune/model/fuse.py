"""The LM's inference form: adapters folded in where that is exact, and projections that read the
same input fused into one matmul (`q/k/v` -> `qkv_proj`, `gate/up` -> `gate_up_proj`).

A decode step at batch 1 is ~200 small matmuls whose fixed cost (dispatch, threading, output
allocation) is of the order of their arithmetic: one matmul of N1+N2+N3 outputs in place of three
saves two of those costs, the same product for each output (bench/bench_decode.py measures it).

    fuse_for_inference(lm)   in place; returns lm. Float LoRA layers are merged first (fp32 sum);
                             weight-only quantised layers are concatenated in their stored form,
                             their float adapters as one adapter of the summed rank (A stacked,
                             B block-diagonal), so nothing is re-quantised or rounded again.
    is_fused(module)         whether any layer under `module` is in that form.

The fused form is for inference only: it cannot be trained with LoRA, quantised or saved (the
folder writers refuse it), since its parameter names are not those of the checkpoint formats.
"""

from __future__ import annotations

import torch
from torch import nn

from vitune.model.lm import LM, MLP, Attention
from vitune.model.lora import LoRALinear
from vitune.model.quant import QuantConfig, QuantLinear, QuantLoRALinear

FUSED = {Attention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")), MLP: ("gate_up_proj", ("gate_proj", "up_proj"))}


@torch.no_grad()
def _cat_linear(parts: list[nn.Linear]) -> nn.Linear:
    w = parts[0].weight
    has_bias = parts[0].bias is not None
    out = nn.Linear(w.shape[1], sum(p.out_features for p in parts), bias=has_bias, device=w.device, dtype=w.dtype)
    out.weight.copy_(torch.cat([p.weight for p in parts]))
    if has_bias:
        out.bias.copy_(torch.cat([p.bias for p in parts]))
    return out


def _adapters(part: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A (r, K), scale * B (N, r))` of a quantised layer, fp32; rank 0 for one without adapters."""
    if isinstance(part, QuantLoRALinear):
        return part.lora_A.float(), part.lora_B.float() * part.scale
    return torch.zeros(0, part.in_features), torch.zeros(part.out_features, 0)


@torch.no_grad()
def _cat_quant(parts: list[QuantLinear], name: str) -> QuantLinear:
    cfg: QuantConfig = parts[0].cfg
    K, N = parts[0].in_features, sum(p.out_features for p in parts)
    has_bias = parts[0].bias is not None
    pairs = [_adapters(p) for p in parts]
    rank = sum(a.shape[0] for a, _ in pairs)
    out = (QuantLoRALinear(K, N, has_bias, cfg, name, rank=rank, scale=1.0) if rank
           else QuantLinear(K, N, has_bias, cfg, name))
    for key, buf in parts[0].named_buffers(recurse=False):
        getattr(out, key).copy_(torch.cat([getattr(p, key) for p in parts]))
    if has_bias:
        out.bias.copy_(torch.cat([p.bias for p in parts]))
    if rank:
        out.lora_A.copy_(torch.cat([a for a, _ in pairs]))  # (sum r, K)
        out.lora_B.copy_(torch.block_diag(*[b for _, b in pairs]))  # (sum N, sum r): each part its own rows
    return out.to(parts[0].qweight.device).pack()


def _fuse(parts: list[nn.Module], name: str) -> nn.Module:
    kinds = {type(p) for p in parts}
    if kinds <= {nn.Linear}:
        return _cat_linear(parts)
    if kinds <= {QuantLinear, QuantLoRALinear}:
        cfgs = {p.cfg for p in parts}
        if len(cfgs) == 1 and len({p.bias is None for p in parts}) == 1:
            return _cat_quant(parts, name)
    raise ValueError(f"{name}: cannot fuse layers of kinds {sorted(k.__name__ for k in kinds)} "
                     f"(fuse_for_inference runs after quantisation, on one scheme)")


@torch.no_grad()
def fuse_for_inference(lm: LM) -> LM:
    """In place: float LoRA merged, `q/k/v` and `gate/up` of every layer fused; returns `lm`."""
    if lm.fused:
        return lm
    for parent in list(lm.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, attr, child.merged())
    for mname, module in list(lm.named_modules()):
        fused = FUSED.get(type(module))
        if fused is None:
            continue
        target, sources = fused
        parts = [getattr(module, s) for s in sources]
        setattr(module, target, _fuse(parts, f"lm.{mname}.{target}"))
        for s in sources:
            delattr(module, s)
    return lm


def is_fused(module: nn.Module) -> bool:
    return any(m.fused for m in module.modules() if isinstance(m, LM))


def refuse_fused(module: nn.Module, what: str) -> None:
    if is_fused(module):
        raise ValueError(f"{what}: the model is in its fused inference form (model/fuse.py), whose layers are not "
                         "those of the checkpoint formats; load it again without fusing")

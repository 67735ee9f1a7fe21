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

The fused form is for inference only (its parameters do not require grad): quantisation, the
folder writers and the transformers export refuse it, since its parameter names are not those of
the checkpoint formats.
"""

from __future__ import annotations

import torch
from torch import nn

from vitune.model.lm import LM, MLP, Attention
from vitune.model.lora import LoRALinear
from vitune.model.quant import QuantLinear, QuantLoRALinear

FUSED = {Attention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")), MLP: ("gate_up_proj", ("gate_proj", "up_proj"))}


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


@torch.no_grad()
def _cat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One `nn.Linear` holding the parts' weights (and biases) one after another, in their dtype."""
    out = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False, device="meta")
    out.weight = _param(torch.cat([p.weight for p in parts]))  # no random init: nothing drawn, nothing wasted
    out.bias = None if parts[0].bias is None else _param(torch.cat([p.bias for p in parts]))
    return out


def _adapters(part: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A (r, K), scale * B (N, r))` of a quantised layer, in its dtype; rank 0 for one without adapters."""
    if isinstance(part, QuantLoRALinear):
        return part.lora_A, part.lora_B * part.scale
    like = part.qweight.new_zeros(0, dtype=torch.float32)
    return like.new_zeros(0, part.in_features), like.new_zeros(part.out_features, 0)


@torch.no_grad()
def _cat_quant(parts: list[QuantLinear], name: str) -> QuantLinear:
    """One quantised layer: the parts' stored tensors one after another (each in its dtype, not
    quantised again), their adapters as one of the summed rank: A stacked, B block-diagonal."""
    K, N = parts[0].in_features, sum(p.out_features for p in parts)
    pairs = [_adapters(p) for p in parts]
    rank = sum(a.shape[0] for a, _ in pairs)
    out = (QuantLoRALinear(K, N, False, parts[0].cfg, name, rank=rank, scale=1.0) if rank
           else QuantLinear(K, N, False, parts[0].cfg, name)).to("meta")
    for key, _ in parts[0].named_buffers(recurse=False):
        out._buffers[key] = torch.cat([p._buffers[key] for p in parts])
    out.bias = None if parts[0].bias is None else _param(torch.cat([p.bias for p in parts]))
    if rank:
        dtype = next(p.lora_A.dtype for p in parts if isinstance(p, QuantLoRALinear))
        out.lora_A = _param(torch.cat([a.to(dtype) for a, _ in pairs]))  # (sum r, K)
        out.lora_B = _param(torch.block_diag(*[b.to(dtype) for _, b in pairs]))  # (sum N, sum r): each its rows
    out._stale()
    return out.pack()


def _check(parts: list[nn.Module], name: str) -> None:
    kinds = {type(p) for p in parts}
    if kinds <= {nn.Linear, LoRALinear}:
        return
    if (kinds <= {QuantLinear, QuantLoRALinear} and len({p.cfg for p in parts}) == 1
            and len({p.bias is None for p in parts}) == 1):
        return
    raise ValueError(f"{name}: cannot fuse layers of kinds {sorted(k.__name__ for k in kinds)} "
                     f"(fuse_for_inference runs after quantisation, on one scheme)")


def _groups(lm: LM) -> list[tuple[nn.Module, str, tuple[str, ...], str]]:
    """(module, fused attribute, source attributes, name) for every Attention and MLP of the LM."""
    return [(m, FUSED[type(m)][0], FUSED[type(m)][1], f"lm.{n}.{FUSED[type(m)][0]}")
            for n, m in lm.named_modules() if type(m) in FUSED]


@torch.no_grad()
def fuse_for_inference(lm: LM) -> LM:
    """In place: float LoRA merged, `q/k/v` and `gate/up` of every layer fused; returns `lm`. Every
    layer is checked before any is changed: a refusal leaves the LM as it was."""
    if lm.fused:
        return lm
    groups = _groups(lm)
    for module, _, sources, name in groups:
        _check([getattr(module, s) for s in sources], name)
    for parent in list(lm.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, attr, child.merged())
    for module, target, sources, name in groups:
        parts = [getattr(module, s) for s in sources]
        fused = _cat_linear(parts) if isinstance(parts[0], nn.Linear) else _cat_quant(parts, name)
        setattr(module, target, fused)
        for s in sources:
            delattr(module, s)
    return lm


def is_fused(module: nn.Module) -> bool:
    return any(m.fused for m in module.modules() if isinstance(m, LM))


def refuse_fused(module: nn.Module, what: str) -> None:
    if is_fused(module):
        raise ValueError(f"{what}: the model is in its fused inference form (model/fuse.py), whose layers are not "
                         "those of the checkpoint formats; load it again without fusing")

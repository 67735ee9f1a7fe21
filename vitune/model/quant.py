"""Weight-only quantisation of the LM's linear layers on PyTorch's own CPU kernels.

    int8: symmetric, one scale per output channel      W ~ q * s[n]                q in [-127, 127]
    int4: asymmetric, group-wise along in_features     W ~ (q - 8) * s[n, g] + z[n, g]   q in [0, 15]

`QuantLinear` keeps `nn.Linear`'s call interface (`(..., in) -> (..., out)`, output in the input's
dtype); activations are cast to bf16 for the kernels (they want bf16 inputs and scales: with fp32
they are 20-600x slower). Batches of up to `KERNEL_MAX_ROWS` rows (decoding) run the weight-only
kernels `aten._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu`; longer ones (a prefill)
dequantise to bf16 and run a dense matmul, which is faster there.

LoRA adapters are not merged before quantising: the packaged SmolLM2 weights are Q4_1 already
(4-bit, groups of 32), so int4 with groups of 32 reproduces the base almost exactly, and a merged
weight `W + BA` rounds back onto the base's grid, dropping the tuning (measured: easy-VQA 99.6 % ->
5 %). `QuantLoRALinear` keeps them beside the quantised base, as QLoRA does: two small matmuls more.

The stored form (`qweight`, `scales`, `zeros`: buffers, in the state dict) is simple and
independent of torch's internal int4 tile layout; the kernels' packed copy is rebuilt from it
(`pack()`) after quantising, loading, or moving the module.

    QuantConfig(bits=8 | 4, group_size)   the scheme (frozen; each bad value named)
    quantize_lm(lm, cfg)                  q/k/v/o and gate/up/down of every layer, and the output head
                                          (a tied head gets a quantised copy; the embedding stays as is);
                                          a layer with LoRA adapters keeps them in float over its
                                          quantised base weight (`QuantLoRALinear`)
    quantized_layout(lm, cfg)             the same layers, zero-filled: for loading a quantised state
    dequantize_lm(lm)                     back to float `nn.Linear`s (a reference for tests)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitune.config import ConfigError
from vitune.model.lm import LM
from vitune.model.lora import LoRALinear

KERNEL_MAX_ROWS = 64          # above: dequantise + dense bf16 matmul (the kernels scale ~linearly in rows)
ROW_CHUNK = 4096              # rows quantised / packed at a time: small temporaries, reused (no page faults)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts
DEFAULT_GROUP_SIZE = 32
INT8_K_MULTIPLE = 16          # `_weight_int8pack_mm` returns garbage or crashes for other in_features
INT4_N_MULTIPLE = 16          # the int4 tile layout; other out_features are padded with zero rows
HEAD = "lm_head"
aten = torch.ops.aten


@dataclass(frozen=True)
class QuantConfig:
    """`bits=8`: per output channel (no group size); `bits=4`: groups of `group_size` inputs (default 32)."""

    bits: Literal[4, 8] = 8
    group_size: int | None = None

    def __post_init__(self):
        if type(self.bits) is not int or self.bits not in (4, 8):
            raise ConfigError(f"quantization.bits must be 8 or 4, got {self.bits!r}")
        if self.bits == 8 and self.group_size is not None:
            raise ConfigError(f"quantization.group_size applies to bits=4 only (int8 has one scale per output "
                              f"channel), got group_size={self.group_size!r}")
        if self.bits == 4 and self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
        if self.bits == 4 and (type(self.group_size) is not int or self.group_size not in INT4_GROUP_SIZES):
            raise ConfigError(f"quantization.group_size must be one of {list(INT4_GROUP_SIZES)} for bits=4 "
                              f"(the CPU int4 kernel's), got {self.group_size!r}")

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4 (groups of {self.group_size})"

    def check_layer(self, name: str, in_features: int) -> None:
        """Refuse, naming the layer, a width the kernels cannot take (other out_features are padded)."""
        if self.bits == 8 and in_features % INT8_K_MULTIPLE:
            raise ConfigError(f"{name}: in_features {in_features} is not a multiple of {INT8_K_MULTIPLE}, which "
                              "the int8 kernel needs; this layer cannot be quantised to int8")
        if self.bits == 4 and in_features % self.group_size:
            fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
            raise ConfigError(f"{name}: in_features {in_features} is not a multiple of quantization.group_size "
                              f"{self.group_size}" + (f"; choose one of {fits}" if fits else
                                                      "; no int4 group size divides it"))


def _int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """`(N, K)` float -> qweight `(N, K)` int8, scales `(N,)` bf16 (zero rows get scale 1)."""
    amax = w.abs().amax(1)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(torch.bfloat16)
    q = (w / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": s}


def _int4(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """`(N, K)` float -> qweight `(N, K/2)` uint8 (even column in the low nibble), scales and zeros `(N, K/g)` bf16.

    Scales and zeros are rounded to bf16 (what the kernel reads) before `q` is chosen against them. A
    constant group gets a scale that maps it exactly: |v|/8 (or 1 for zeros), zero v + |v|."""
    N, K = w.shape
    wg = w.reshape(N, K // group, group)  # (N, G, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    flat = torch.where(lo != 0, lo.abs() / 8, torch.ones_like(lo))
    s = torch.where(hi > lo, (hi - lo) / 15, flat).to(torch.bfloat16).float()
    z = (lo + 8 * s).to(torch.bfloat16).float()
    q = ((wg - z[..., None]) / s[..., None] + 8).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2)
    return {"qweight": packed.contiguous(), "scales": s.to(torch.bfloat16), "zeros": z.to(torch.bfloat16)}


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`(N, K/2)` uint8 -> `(N, K)` uint8 values in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _int4_kernel_weight(packed: torch.Tensor, pad: int) -> torch.Tensor:
    """The stored `(N, K/2)` form -> `_weight_int4pack_mm_for_cpu`'s tiles for `N + pad` rows, converted
    `ROW_CHUNK` rows at a time when torch's tiles are independent across such chunks (checked once)."""
    def convert(rows: torch.Tensor, extra: int) -> torch.Tensor:
        q = F.pad(_unpack_int4(rows).to(torch.int32), (0, 0, 0, extra), value=8)
        return aten._convert_weight_to_int4pack_for_cpu(q, 2)
    N = packed.shape[0]
    if N <= ROW_CHUNK or not _chunks_convert_alike():
        return convert(packed, pad)
    starts = range(0, N, ROW_CHUNK)
    return torch.cat([convert(packed[i:i + ROW_CHUNK], pad if i + ROW_CHUNK >= N else 0) for i in starts])


_CHUNKS_OK: list[bool] = []


def _chunks_convert_alike() -> bool:
    """Whether converting rows in blocks of ROW_CHUNK gives the whole conversion (a tile layout of <=
    ROW_CHUNK rows, as in torch 2.13's blocks of 64); probed once on a small tensor."""
    if not _CHUNKS_OK:
        chunk = 64
        q = torch.randint(0, 16, (3 * chunk + 16, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        whole = aten._convert_weight_to_int4pack_for_cpu(q, 2)
        parts = torch.cat([aten._convert_weight_to_int4pack_for_cpu(q[i:i + chunk].contiguous(), 2)
                           for i in range(0, q.shape[0], chunk)])
        _CHUNKS_OK.append(ROW_CHUNK % chunk == 0 and torch.equal(whole, parts))
    return _CHUNKS_OK[0]


def _after_load(module: "QuantLinear", _keys) -> None:
    module._stale()  # new stored tensors: the kernels' copy is rebuilt on first use


class QuantLinear(nn.Module):
    """A weight-only quantised `nn.Linear` (no float `weight`; `bias` stays a float parameter)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig, name: str = "layer"):
        super().__init__()
        cfg.check_layer(name, in_features)
        self.in_features, self.out_features, self.cfg, self.name = in_features, out_features, cfg, name
        N, K = out_features, in_features
        if cfg.bits == 8:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(N, dtype=torch.bfloat16))
        else:
            G = K // cfg.group_size
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(N, G, dtype=torch.bfloat16))
            self.register_buffer("zeros", torch.zeros(N, G, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.zeros(N)) if bias else None
        self._kernel: tuple | None = None  # (weight, scales, bias) as the kernels take them: pack()
        self.register_load_state_dict_post_hook(_after_load)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, cfg: QuantConfig,
                    name: str = "layer") -> "QuantLinear":
        N, K = weight.shape
        return cls(K, N, bias is not None, cfg, name)._fill(weight, bias).to(weight.device).pack()

    @torch.no_grad()
    def _fill(self, weight: torch.Tensor, bias: torch.Tensor | None) -> "QuantLinear":
        """Quantise `weight (out, in)` into the stored form, `ROW_CHUNK` rows at a time."""
        w = weight.detach().cpu()
        if not bool(torch.isfinite(w).all()):
            raise ConfigError(f"{self.name}: the weight holds NaN or infinite values; it cannot be quantised")
        for i in range(0, self.out_features, ROW_CHUNK):
            rows = w[i:i + ROW_CHUNK].float()
            for key, value in (_int8(rows) if self.cfg.bits == 8 else _int4(rows, self.cfg.group_size)).items():
                getattr(self, key)[i:i + ROW_CHUNK] = value
        if bias is not None:
            self.bias.copy_(bias.detach())
        return self

    def __getattr__(self, key: str):
        if key == "weight":  # what code written for nn.Linear reaches for first
            raise AttributeError(f"{self.name} is weight-only quantised ({self.cfg.name}): it has no float weight. "
                                 "Quantised models are for inference; dequantize() gives an approximation")
        return super().__getattr__(key)

    def _stale(self) -> None:
        self._kernel = None

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._stale()  # moved or cast: the kernels' copy is rebuilt from the stored form
        return self

    @torch.no_grad()
    def pack(self) -> "QuantLinear":
        """Build the kernels' copy from the stored form: (weight, bf16 scales [and zeros], bias). The
        scales go to bf16 whatever dtype the module was cast to; call again after replacing a tensor."""
        if self.qweight.device.type != "cpu":
            raise ValueError(f"{self.name}: weight-only quantised layers run on PyTorch's CPU kernels only, "
                             f"not on {self.qweight.device}")
        if self.cfg.bits == 8:
            self._kernel = (self.qweight, self.scales.to(torch.bfloat16), self.bias)
            return self
        pad = -self.out_features % INT4_N_MULTIPLE  # zero rows: q = 8, scale 0, zero 0
        sz = torch.stack([self.scales, self.zeros], dim=-1).to(torch.bfloat16)  # (N, G, 2)
        sz = F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous()  # (G, N + pad, 2)
        self._kernel = (_int4_kernel_weight(self.qweight, pad), sz, self.bias)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer stands for, `(out, in)`."""
        return self.base_weight(dtype)

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The quantised weight, `(out, in)`, dequantised."""
        if self.cfg.bits == 8:
            return (self.qweight.to(dtype) * self.scales.to(dtype)[:, None])
        N, K, g = self.out_features, self.in_features, self.cfg.group_size
        q = _unpack_int4(self.qweight).to(dtype).reshape(N, K // g, g)
        return ((q - 8) * self.scales.to(dtype)[..., None] + self.zeros.to(dtype)[..., None]).reshape(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, scales, bias = self._kernel if self._kernel is not None else self.pack()._kernel
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x.dtype is not torch.bfloat16:  # (tested first: a no-op cast still costs a dispatch per call)
            x2 = x2.to(torch.bfloat16)
        x2 = x2.contiguous()
        if x2.shape[0] > KERNEL_MAX_ROWS:
            y = F.linear(x2, self.base_weight(torch.bfloat16))
        elif self.cfg.bits == 8:
            y = aten._weight_int8pack_mm(x2, w, scales)
        else:
            y = aten._weight_int4pack_mm_for_cpu(x2, w, self.cfg.group_size, scales)
            y = y[:, :self.out_features] if y.shape[1] != self.out_features else y
        y = self._adapt(x.reshape(-1, self.in_features), y)
        y = y.reshape(*x.shape[:-1], self.out_features)  # (..., N)
        if x.dtype is not torch.bfloat16:
            y = y.to(x.dtype)
        return y if bias is None else y + bias.to(y.dtype)

    def _adapt(self, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`x (M, K)` as given, `y (M, N)` bf16 -> `(M, N)`: what is added to the base's product (nothing here)."""
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.cfg.name}")


class QuantLoRALinear(QuantLinear):
    """A `QuantLinear` whose LoRA adapters stay in float beside the quantised base (QLoRA's form):
    `y = x Wq^T + scale * (x A^T) B^T`. `lora_A (r, in)` and `lora_B (out, r)` are parameters under
    the names `LoRALinear` gives them; the kernels' copy holds `A^T` and `scale * B^T` in fp32: small
    bf16 matmuls are 7x slower than fp32 ones on this CPU (oneDNN's fixed cost; bench/bench_decode.py).
    For inference: that copy is detached, rebuilt by `pack()` (after loading, moving or casting); call
    `pack()` after editing the adapters in place."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig, name: str = "layer",
                 rank: int = 1, scale: float = 1.0):
        super().__init__(in_features, out_features, bias, cfg, name)
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale
        self._adapters: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_lora(cls, layer: LoRALinear, cfg: QuantConfig, name: str, zero_filled: bool = False) -> "QuantLoRALinear":
        """The base weight of `layer` quantised (unless `zero_filled`: a layout to load into), its adapters copied."""
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, cfg, name,
                rank=layer.lora_A.shape[0], scale=layer.scale)
        if not zero_filled:
            q._fill(layer.weight, layer.bias)
            with torch.no_grad():
                q.lora_A.copy_(layer.lora_A.detach())
                q.lora_B.copy_(layer.lora_B.detach())
        q = q.to(layer.weight.device)
        return q if zero_filled else q.pack()

    def _stale(self) -> None:
        super()._stale()
        self._adapters = None

    @torch.no_grad()
    def pack(self) -> "QuantLoRALinear":
        super().pack()
        self._adapters = (self.lora_A.float().t().contiguous(),  # (K, r)
                          (self.lora_B.float() * self.scale).t().contiguous())  # (r, N)
        return self

    def delta(self) -> torch.Tensor:
        """The adapters' change to the weight: `scale * B @ A`, `(out, in)`, fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.base_weight(torch.float32) + self.delta()).to(dtype)

    def _adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        at, bt = self._adapters if self._adapters is not None else self.pack()._adapters
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast would run them in bf16
            return y.add_(torch.mm(torch.mm(x.float(), at), bt))  # (M, N) += (M, K) @ (K, r) @ (r, N), fp32

    def extra_repr(self) -> str:
        return super().extra_repr() + f", LoRA rank {self.lora_A.shape[0]} (float)"


# ------------------------------------------------------------------------------ the LM's layers

def _targets(lm: LM) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, name, layer) for every linear of the decoder layers, in order."""
    return [(parent, attr, f"layers.{i}.{pname}.{attr}".replace("..", "."), child)
            for i, block in enumerate(lm.layers) for pname, parent in block.named_modules()
            for attr, child in parent.named_children() if isinstance(child, (nn.Linear, LoRALinear, QuantLinear))]


def _refuse(lm: LM) -> None:
    if lm.fused:
        raise ConfigError("the LM is in its fused inference form (model/fuse.py): quantise the model as loaded, "
                          "before fusing")
    for name, module in lm.named_modules():
        if isinstance(module, QuantLinear):
            raise ConfigError(f"lm.{name} is already quantised ({module.cfg.name})")


def quantized_names(lm: LM) -> list[str]:
    """The layers `quantize_lm` replaces, named relative to the LM (`layers.0.self_attn.q_proj`, ..., `lm_head`)."""
    return [name for _, _, name, _ in _targets(lm)] + [HEAD]


def _replace(lm: LM, cfg: QuantConfig, zero_filled: bool) -> LM:
    _refuse(lm)
    head_w = lm.head_weight()
    targets = _targets(lm)
    for _, _, name, layer in targets:  # every shape checked before anything changes
        cfg.check_layer(f"lm.{name}", layer.in_features)
    cfg.check_layer(f"lm.{HEAD}", head_w.shape[1])
    for parent, attr, name, layer in targets:
        if isinstance(layer, LoRALinear):
            setattr(parent, attr, QuantLoRALinear.from_lora(layer, cfg, f"lm.{name}", zero_filled))
        else:
            setattr(parent, attr, _quantized(layer.weight, layer.bias, cfg, f"lm.{name}", zero_filled))
    head_bias = None if lm.lm_head is None else lm.lm_head.bias
    lm.lm_head = _quantized(head_w, head_bias, cfg, f"lm.{HEAD}", zero_filled)  # a tied head: a copy
    return lm


def _quantized(weight, bias, cfg: QuantConfig, name: str, zero_filled: bool) -> QuantLinear:
    if not zero_filled:
        return QuantLinear.from_weight(weight, bias, cfg, name)
    return QuantLinear(weight.shape[1], weight.shape[0], bias is not None, cfg, name).to(weight.device)


@torch.no_grad()
def quantize_lm(lm: LM, cfg: QuantConfig) -> LM:
    """Replace, in place, the LM's decoder linears and its output head by `QuantLinear`s; returns `lm`.
    A tied head (`cfg.tie_embeddings`) gets a quantised copy as `lm.lm_head`: the embedding table stays.
    LoRA layers become `QuantLoRALinear`s (the base quantised, the adapters kept in float). Refuses
    shapes the kernels cannot take, naming the layer, before any change."""
    return _replace(lm, cfg, zero_filled=False)


def quantized_layout(lm: LM, cfg: QuantConfig) -> LM:
    """`quantize_lm`'s layers, zero-filled, for `load_state_dict` of a quantised state."""
    return _replace(lm, cfg, zero_filled=True)


def quantized_layers(module: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def dequantize_lm(lm: LM, dtype: torch.dtype = torch.float32) -> LM:
    """Every `QuantLinear` back to an `nn.Linear` holding its dequantised weight, a `QuantLoRALinear`'s
    adapters merged into it (in place)."""
    for parent in list(lm.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   dtype=dtype, device=child.qweight.device)
                linear.weight.copy_(child.dequantize(dtype))
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
                setattr(parent, attr, linear)
    return lm

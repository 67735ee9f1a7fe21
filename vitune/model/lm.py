"""Language model: a Llama-family causal decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention)
with a preallocated KV cache.

Module names follow Hugging Face's `LlamaForCausalLM` without the `model.` prefix, so Llama,
SmolLM2 and Qwen2 checkpoints load through an explicit key map (checkpoints/hf_import.py).

    embed(ids) -> (B, T, D_lm);  forward(inputs_embeds, positions, ...) -> hidden (B, T, D_lm);
    logits(hidden) -> (B, T, V)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitune.config import LMConfig
from vitune.model.attention import fp32_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight.to(x.dtype)


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for `positions (B, T)` -> each `(B, 1, T, head_dim)` (HF's rotate-half layout)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[..., None] * inv  # (B, T, hd/2)
    ang = torch.cat([ang, ang], dim=-1)[:, None]  # (B, 1, T, hd)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


@dataclass
class KVCache:
    """Per-layer key/value buffers `(B, H_kv, T_max, hd)`; `length` tokens are filled."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: LMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> "KVCache":
        hd = cfg.head_dim or cfg.dim // cfg.heads
        shape = (batch, cfg.kv_heads, max_len, hd)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache full: {end} > {self.k[layer].shape[2]} positions")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.head_dim or cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.dim, bias=False)
        self.qkv_proj: nn.Module | None = None  # q/k/v as one matmul, for inference (model/fuse.py)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.kv_heads * self.head_dim
        return self.qkv_proj(x).split((self.heads * self.head_dim, kv, kv), -1)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.reshape(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, S, hd)
        if mask is None and k.shape[2] != T:  # queries follow cached keys: causal with an offset
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
        with fp32_attention(x):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None,
                enable_gqa=self.heads != self.kv_heads,
            ).to(x.dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate/up as one matmul, for inference (model/fuse.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(_init_weights)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Ids past the table (e.g. an added <image> placeholder) embed as 0; they are overwritten.
        return self.embed_tokens(input_ids.clamp(max=self.cfg.vocab_size - 1))

    @property
    def fused(self) -> bool:
        """Whether the layers are in model/fuse.py's inference form (q/k/v, gate/up as one matmul each)."""
        return any(b.self_attn.qkv_proj is not None or b.mlp.gate_up_proj is not None for b in self.layers)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):
            return self.lm_head(hidden)  # a replaced head: model/quant.py's weight-only quantised copy
        return F.linear(hidden, self.head_weight().to(hidden.dtype))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        before_layer: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`inputs_embeds (B, T, D)`, `positions (B, T)`, `mask (B, 1, T, S)` bool or None (causal).
        `before_layer(i, x, positions) -> x` runs before decoder layer i (gated cross-attention)."""
        hd = self.cfg.head_dim or self.cfg.dim // self.cfg.heads
        cos, sin = rope_tables(hd, self.cfg.rope_theta, positions)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                x = before_layer(i, x, positions)
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)  # (B, T, D_lm)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)

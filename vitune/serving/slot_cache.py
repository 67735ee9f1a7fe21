"""The serving KV cache: one row ("slot") per running request, each with its own length.

`LM.forward` uses it like `model.lm.KVCache`: every layer calls `update(layer, k, v)` and the
forward ends with `cache.length += T`. Before a forward the engine `select`s the slots its batch
rows are (in row order); `update` writes each row's new keys at that slot's own length and hands
back the keys of positions `0 .. max(length) + T` of the selected slots. Slots shorter than the
longest hold stale keys past their length: the attention mask (`slot_mask`) hides them.

A slot's tokens start at position 0 (no left padding), so a token's RoPE position equals the
number of tokens before it in its slot: `positions = lengths + 0 .. T-1` for T new tokens (one
for a decoding step). A prefill of several prompts is right-padded to the longest: `prefilled`
then sets each slot's length to its own prompt's (the padding's keys stay behind it, stale).

`SharedPrefix` keeps the keys/values of the text a prompt starts with (its chat template's
opening, a system prompt), so that prompts starting the same way copy them into their slot
instead of computing them again.

    k[layer], v[layer]: (n_slots, H_kv, T_max, hd);  lengths: (n_slots,) tokens filled
"""

from __future__ import annotations

import torch

from vitune.config import LMConfig
from vitune.data.packing import common_prefix_len
from vitune.model.cross_attention import CrossContext


class SlotCache:
    def __init__(self, cfg: LMConfig, n_slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        hd = cfg.head_dim or cfg.dim // cfg.heads
        shape = (n_slots, cfg.kv_heads, max_len, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.max_len = max_len
        self.lengths = [0] * n_slots
        self.rows: list[int] = []
        self.device = device

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    def select(self, rows: list[int]) -> None:
        """The slots the next forward's batch rows are, in row order."""
        if not rows or len(set(rows)) != len(rows) or not all(0 <= r < self.n_slots for r in rows):
            raise ValueError(f"select needs distinct slots in 0..{self.n_slots - 1}, got {rows}")
        self.rows = list(rows)

    def prefilled(self, slots: list[int], lengths: list[int]) -> None:
        """After a right-padded prefill into `slots`: each holds `lengths[i]` tokens, not the padding."""
        for slot, n in zip(slots, lengths):
            self.lengths[slot] = n

    @property
    def length(self) -> int:
        """The longest selected slot (what `LM.forward` advances with `+= T`)."""
        return max(self.lengths[r] for r in self.rows)

    @length.setter
    def length(self, value: int) -> None:
        step = value - self.length
        for r in self.rows:
            self.lengths[r] += step

    def _index(self) -> slice | torch.Tensor:
        lo = self.rows[0]
        if self.rows == list(range(lo, lo + len(self.rows))):
            return slice(lo, lo + len(self.rows))  # contiguous slots: a view, no copy
        return torch.tensor(self.rows, device=self.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`k, v (B, H_kv, T, hd)` for the selected slots -> their keys/values `(B, H_kv, S, hd)`,
        S = max(length) + T."""
        B, _, T, _ = k.shape
        if B != len(self.rows):
            raise ValueError(f"{B} batch rows but {len(self.rows)} selected slots")
        starts = [self.lengths[r] for r in self.rows]
        end = max(starts) + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        if T == 1:  # (under bf16 autocast k, v come as bf16: stored in the cache's dtype, as slices cast)
            rows = torch.tensor(self.rows, device=self.device)
            cols = torch.tensor(starts, device=self.device)
            self.k[layer][rows, :, cols] = k[:, :, 0].to(self.k[layer].dtype)
            self.v[layer][rows, :, cols] = v[:, :, 0].to(self.v[layer].dtype)
        else:
            for i, (r, s) in enumerate(zip(self.rows, starts)):
                self.k[layer][r, :, s:s + T] = k[i]
                self.v[layer][r, :, s:s + T] = v[i]
        index = self._index()
        return self.k[layer][index, :, :end], self.v[layer][index, :, :end]


def slot_mask(starts: list[int], T: int, device: torch.device) -> torch.Tensor:
    """`(B, 1, T, S)` bool for T new tokens per row written from its slot's length `starts[i]`:
    the row's query j (position `starts[i] + j`) sees the slot's positions up to its own, none of
    the stale ones past them; S = max(starts) + T. Right padding: a pad query sees the row's real
    tokens and earlier pads (never nothing), and no real query sees a pad."""
    first = torch.tensor(starts, device=device)
    queries = first[:, None] + torch.arange(T, device=device)[None, :]  # (B, T) positions
    keys = torch.arange(int(first.max()) + T, device=device)
    return (keys[None, None, :] <= queries[:, :, None])[:, None]


def decode_mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    """`slot_mask` for one new token per row, written at its slot's length: `(B, 1, 1, S)`."""
    return slot_mask(lengths, 1, device)


class SharedPrefix:
    """The keys/values of the start of the last prompt kept: its tokens before its first image
    (all but its last if it has none). Positions before any image do not depend on the images,
    for every fusion kind (causal attention; a cross-attention marker is an image token), so a
    prompt that starts the same way may copy them instead of computing them."""

    def __init__(self):
        self.ids: list[int] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def match(self, prompt: list[int]) -> int:
        """How many first tokens of `prompt` are kept (never all: its last is computed)."""
        return min(common_prefix_len([self.ids, prompt]), len(prompt) - 1)

    def load(self, cache: SlotCache, slot: int, n: int) -> None:
        """Put the first `n` kept positions in `slot`, which then holds `n` tokens."""
        for layer in range(len(self.k) if n else 0):
            cache.k[layer][slot, :, :n] = self.k[layer][:, :n]
            cache.v[layer][slot, :, :n] = self.v[layer][:, :n]
        cache.lengths[slot] = n

    def keep(self, cache: SlotCache, slot: int, prompt: list[int], image_id: int) -> None:
        """Keep the start of `prompt`, just prefilled into `slot`, unless it is kept already."""
        n = prompt.index(image_id) if image_id in prompt else len(prompt) - 1
        if prompt[:n] == self.ids[:n] and n <= len(self.ids):
            return
        self.ids = prompt[:n]
        self.k = [k[slot, :, :n].clone() for k in cache.k]
        self.v = [v[slot, :, :n].clone() for v in cache.v]


def merge_cross(contexts: list[CrossContext]) -> CrossContext:
    """One batch's visual context (gated cross-attention) from each row's own, computed at its
    prefill (batch of one): keys/values padded to the longest with zeros, their marker positions
    with -1 (never visible), so a row sees exactly the images it saw alone."""
    if len(contexts) == 1:
        return contexts[0]
    S = max(c.key_pos.shape[1] for c in contexts)

    def pad(x: torch.Tensor, dim: int, value: float) -> torch.Tensor:
        extra = list(x.shape)
        extra[dim] = S - x.shape[dim]
        return torch.cat([x, x.new_full(extra, value)], dim)

    kv = {layer: tuple(torch.cat([pad(c.kv[layer][j], 2, 0.0) for c in contexts]) for j in (0, 1))
          for layer in contexts[0].kv}
    key_pos = torch.cat([pad(c.key_pos, 1, -1) for c in contexts])
    return CrossContext(contexts[0].module, kv, key_pos)

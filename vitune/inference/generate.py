"""Decoding: greedy or sampled (temperature, top-p) generation with a KV cache, for batches of
prompts with images, with stop tokens, stop strings and streaming.

Prompts are left-padded; each row's positions count its own tokens only, and a pad query
attends to itself alone (never a fully-masked row). `use_cache=False` recomputes the whole
sequence every step: slower, and the reference the cached path is tested against. `compile=True`
runs the steps after the prefill as one compiled function of fixed shapes (static_decode.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from vitune.inference.static_decode import StaticDecoder, static_length
from vitune.model.lm import KVCache
from vitune.model.vlm import VLM, Instructions


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0: greedy
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    use_cache: bool = True
    compile: bool = False           # the decode step under torch.compile (static_decode.py)

    def __post_init__(self):
        """Each bad value is refused naming its field; `not (x >= 0)` also catches nan."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        need = f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
        if not (0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy): {need}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1]: {need}")
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) for s in self.stop_strings):
            raise ValueError(f"stop_strings must be a tuple of strings, got {self.stop_strings!r}")
        if any(s == "" for s in self.stop_strings):
            raise ValueError("stop_strings must not hold an empty string (it would stop before the first token)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.compile, bool) or (self.compile and not self.use_cache):
            raise ValueError(f"compile must be True or False, and needs use_cache=True; got compile={self.compile!r}, "
                             f"use_cache={self.use_cache!r}")


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, L - len(p):] = True
    return ids.to(device), valid.to(device)


def _attn_mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """`(B, 1, q_len, S)`: causal over the last q_len of S positions, keys must be valid (or self)."""
    B, S = valid.shape
    q_pos = torch.arange(S - q_len, S, device=valid.device)[:, None]
    k_pos = torch.arange(S, device=valid.device)[None, :]
    return ((k_pos <= q_pos) & valid[:, None, :] | (k_pos == q_pos))[:, None]


def _pick(logits: torch.Tensor, gen: GenerationConfig, rng: torch.Generator) -> torch.Tensor:
    if gen.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / gen.temperature, dim=-1)
    if gen.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > gen.top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


@torch.inference_mode()
def generate_steps(
    model: VLM, prompts: list[list[int]], pixel_values: torch.Tensor | None, gen: GenerationConfig, pad_id: int,
    shared_prefix: int = 0, instructions: Instructions | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row `(B,)`, step by step; the caller decides when to stop.

    `shared_prefix=P`: every prompt starts with the same P tokens, which hold all the image tokens,
    and `pixel_values` are those images once. The prefix runs once and its keys and values are
    copied to every row: the same answers as without it, for much less work when many questions
    ask about one image. `instructions`: each image's instruction ids and mask, for a model whose
    image tokens depend on them (`VLM.needs_instruction`; then no shared prefix).
    """
    if shared_prefix and not model.shares_image_prefix:
        raise ValueError(f"shared_prefix shares image tokens across questions; with model.fusion.kind="
                         f"{model.cfg.fusion.kind} they depend on each question or are not in the sequence")
    device = next(model.parameters()).device
    rng = torch.Generator(device="cpu").manual_seed(gen.seed)
    if shared_prefix:
        hidden, positions, valid, cache = _prefill_shared(model, prompts, pixel_values, gen, pad_id, shared_prefix)
        embeds, cross = None, None
    else:
        ids, valid = _left_pad(prompts, pad_id, device)
        L = ids.shape[1]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        # gated cross-attention: the images' keys/values are projected here, once, for every step
        embeds, cross = model.prepare(ids, pixel_values, instructions, positions)  # (B, L, D)
        cache = KVCache.empty(model.cfg.lm, len(prompts), _cache_length(L + gen.max_new_tokens, gen),
                              embeds.dtype, device) if gen.use_cache else None
        hidden = model.lm(embeds, positions, _attn_mask(valid, L), cache, cross)
    if gen.compile and cross is not None:
        raise ValueError(f"compile=True: the compiled decode step has no gated cross-attention "
                         f"(model.fusion.kind={model.cfg.fusion.kind}); decode it with compile=False")
    static = StaticDecoder(model.lm, cache, valid) if gen.compile else None
    B = len(prompts)
    logits = model.lm.logits(hidden[:, -1])
    for step in range(gen.max_new_tokens):
        token = _pick(logits, gen, rng).to(device)  # (B,)
        yield token
        if step == gen.max_new_tokens - 1:
            return  # no forward pass for a token nobody will read
        step_pos = positions[:, -1:] + 1
        if static is not None:
            positions, logits = step_pos, static.step(token, step_pos)
            continue
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
        new = model.lm.embed(token[:, None])  # (B, 1, D)
        if cache is not None:
            positions = step_pos
            hidden = model.lm(new, step_pos, _attn_mask(valid, 1), cache, cross)
        else:
            embeds, positions = torch.cat([embeds, new], 1), torch.cat([positions, step_pos], 1)
            hidden = model.lm(embeds, positions, _attn_mask(valid, valid.shape[1]), None, cross)
        logits = model.lm.logits(hidden[:, -1])


def _cache_length(needed: int, gen: GenerationConfig) -> int:
    return static_length(needed) if gen.compile else needed


def _prefill_shared(model: VLM, prompts: list[list[int]], pixel_values: torch.Tensor | None,
                    gen: GenerationConfig, pad_id: int, P: int):
    """The prefix once (batch 1), its keys/values copied to every row, then the left-padded suffixes."""
    device = next(model.parameters()).device
    prefix = prompts[0][:P]
    if not gen.use_cache:
        raise ValueError("shared_prefix needs use_cache=True")
    if any(p[:P] != prefix or len(p) <= P or model.image_token_id in p[P:] for p in prompts):
        raise ValueError(f"shared_prefix={P}: every prompt must start with the same {P} tokens, holding all its "
                         "image tokens, and go on after them")
    suffix_ids, suffix_valid = _left_pad([p[P:] for p in prompts], pad_id, device)
    B, Ls = suffix_ids.shape
    prefix_embeds = model.embed_inputs(torch.tensor([prefix], device=device), pixel_values)  # (1, P, D)
    one = KVCache.empty(model.cfg.lm, 1, P, prefix_embeds.dtype, device)
    model.lm(prefix_embeds, torch.arange(P, device=device)[None], None, one)
    cache = KVCache.empty(model.cfg.lm, B, _cache_length(P + Ls + gen.max_new_tokens, gen), prefix_embeds.dtype,
                          device)
    for layer in range(len(cache.k)):
        cache.k[layer][:, :, :P] = one.k[layer]
        cache.v[layer][:, :, :P] = one.v[layer]
    cache.length = P
    valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), suffix_valid], 1)
    positions = (valid.long().cumsum(-1) - 1)[:, P:]
    hidden = model.lm(model.lm.embed(suffix_ids), positions, _attn_mask(valid, Ls), cache)
    return hidden, positions, valid, cache


@dataclass
class Generated:
    token_ids: list[list[int]]
    texts: list[str]


def generate(
    model: VLM,
    prompts: list[list[int]],
    pixel_values: torch.Tensor | None,
    gen: GenerationConfig,
    stop_ids: set[int],
    decode: Callable[[list[int]], str],
    pad_id: int,
    on_text: Callable[[str], None] | None = None,
    shared_prefix: int = 0,
    instructions: Instructions | None = None,
) -> Generated:
    """Generate until every row hit a stop token, a stop string, or max_new_tokens.

    `on_text` (batch of one only) receives text deltas as they are decoded: streaming. Each step
    decodes only a row's newest tokens (`_RowText`), not its whole answer.
    """
    if on_text is not None and len(prompts) != 1:
        raise ValueError("streaming needs a batch of one prompt")
    out: list[list[int]] = [[] for _ in prompts]
    rows = [_RowText(decode) for _ in prompts]
    emitted, done = 0, [False] * len(prompts)
    for token in generate_steps(model, prompts, pixel_values, gen, pad_id, shared_prefix, instructions):
        for i, t in enumerate(token.tolist()):
            if done[i]:
                continue
            if t in stop_ids:
                done[i] = True
                continue
            out[i].append(t)
            done[i] = rows[i].add(t, gen.stop_strings)
        if on_text is not None:
            emitted = _stream(rows[0].text, emitted, gen.stop_strings, done[0], on_text)
        if all(done):
            break
    texts = [r.text if r.stopped else decode(ids) for r, ids in zip(rows, out)]  # one full decode per row
    if on_text is not None:
        _stream(texts[0], emitted, (), True, on_text)
    return Generated(out, texts)


class _RowText:
    """One row's text, decoded incrementally: `text == decode(tokens)` at every step.

    The text of `tail` (the newest tokens) is decoded each step and committed to `done` once it
    ends in a whole character (no trailing U+FFFD of a partial UTF-8 sequence). For a byte-level
    decoder (every vitune tokenizer's) the decode of a token list is the concatenation of the
    decodes of its parts cut at whole characters, so this is exact; `generate` still takes each
    unstopped row's final text from one full decode. A stop string is looked for only where it can
    newly appear: from `len(s) - 1` characters before the text that was final a step ago.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.done, self.tail, self.tail_text, self.stopped = decode, "", [], "", False

    @property
    def text(self) -> str:
        return self.done + self.tail_text

    def add(self, token: int, stops: tuple[str, ...]) -> bool:
        """Append a token; True when a stop string appeared (the text is then cut before it)."""
        seen = len(self.done)  # the text before `seen` is final and held no stop string
        self.tail.append(token)
        self.tail_text = self.decode(self.tail)
        hit = self._first_stop(stops, seen)
        if hit is not None:
            self.done, self.tail, self.tail_text, self.stopped = self.text[:hit], [], "", True
        elif not self.tail_text.endswith("\ufffd"):
            self.done, self.tail, self.tail_text = self.done + self.tail_text, [], ""
        return self.stopped

    def _first_stop(self, stops: tuple[str, ...], seen: int) -> int | None:
        if not stops:
            return None
        w0 = max(0, seen - max(len(s) for s in stops) + 1)
        window = self.done[w0:] + self.tail_text  # (the text from w0)
        hits = [w0 + j for s in stops if (j := window.find(s, max(0, seen - len(s) + 1) - w0)) >= 0]
        return min(hits) if hits else None


def _stream(text: str, emitted: int, stops: tuple[str, ...], final: bool, on_text: Callable[[str], None]) -> int:
    """Emit `text[emitted:]`, holding back a partial UTF-8 char or a possible stop-string prefix."""
    end = len(text)
    if not final:
        if text.endswith("\ufffd"):
            end -= 1
        for s in stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end = min(end, len(text[:end]) - k)
                    break
    if end > emitted:
        on_text(text[emitted:end])
        return end
    return emitted

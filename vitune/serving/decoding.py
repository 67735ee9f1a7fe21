"""One request's decoding: from the logits of its batch row to its next token (greedy, or sampled
with its own seeded generator, so a seed reproduces whatever else shares the batch), and from its
tokens to its text, streamed as deltas.

The text rules are those of `inference.generate.generate` and `Assistant.answer`: a stop token
ends the answer and is not part of it, a stop string cuts the text at its first match, streamed
pieces hold back a partial UTF-8 character or a possible stop-string prefix, and the answer is
stripped (leading whitespace dropped, trailing whitespace held back until text follows it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from vitune.inference.generate import GenerationConfig, _pick, _stream

FinishReason = Literal["stop", "length"]


def pick_tokens(logits: torch.Tensor, gens: list[GenerationConfig], rngs: list[torch.Generator]) -> list[int]:
    """`logits (B, V)` -> each row's next token: greedy rows in one argmax, sampled rows each with
    its own generator (`_pick` on that row alone: the draws do not depend on the batch)."""
    greedy = logits.argmax(-1).tolist()
    return [greedy[i] if g.temperature == 0 else int(_pick(logits[i:i + 1], g, rngs[i])[0])
            for i, g in enumerate(gens)]


@dataclass
class StrippedStream:
    """Passes text on without leading whitespace and with trailing whitespace held back until
    more text follows; so the pieces add up to the stripped answer."""

    emit: Callable[[str], None]
    started: bool = False
    held: str = ""

    def __call__(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return
            self.started = True
        body = piece.rstrip()
        if body:
            self.emit(self.held + body)
            self.held = ""
        self.held += piece[len(body):]


@dataclass
class TextState:
    """The tokens and text of one answer so far; `add` takes the next sampled token."""

    gen: GenerationConfig
    stop_ids: frozenset[int]
    decode: Callable[[list[int]], str]
    on_text: Callable[[str], None]
    tokens: list[int] = field(default_factory=list)
    sampled: int = 0
    text: str = ""
    emitted: int = 0
    finish: FinishReason | None = None
    _out: StrippedStream | None = None

    def __post_init__(self):
        self._out = StrippedStream(self.on_text)

    def add(self, token: int) -> bool:
        """Take the next token; True when the answer is finished (`finish` says why)."""
        self.sampled += 1
        if token in self.stop_ids:
            self.finish = "stop"
        else:
            self.tokens.append(token)
            self.text = self.decode(self.tokens)
            hits = [self.text.index(s) for s in self.gen.stop_strings if s in self.text]
            if hits:
                self.text, self.finish = self.text[:min(hits)], "stop"
            elif self.sampled >= self.gen.max_new_tokens:
                self.finish = "length"
        done = self.finish is not None
        self.emitted = _stream(self.text, self.emitted, () if done else self.gen.stop_strings, done, self._out)
        return done

    @property
    def answer(self) -> str:
        """The final text as `Assistant.answer` returns it (stripped)."""
        return self.text.strip()

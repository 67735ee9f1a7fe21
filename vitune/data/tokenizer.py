"""Tokenizer: a thin wrapper over a `tokenizers.Tokenizer` plus the ids of vitune's special tokens.

From-scratch presets use a byte-level BPE trained on the training data (`train_bpe`) or plain
bytes (`byte_level`). Bytes decode back to the exact text; the trained BPE encodes with a
prefix space, so it decodes to the text with one leading space (answers are stripped).
Pretrained LMs bring their own `tokenizer.json`. The wrapper is saved as that one file in every model folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from vitune.conventions import IMAGE_SLOT as _IMAGE_SLOT
from vitune.files import naming

IMAGE_TOKEN = "<image>"
IMAGE_SLOT = _IMAGE_SLOT  # where an image goes in a message's text (conventions.py)
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, IMAGE_TOKEN)


@dataclass(frozen=True)
class SpecialIds:
    eos: int
    im_start: int
    im_end: int
    image: int


class Tokenizer:
    """Text <-> ids. `encode` never makes special tokens: text that spells `<|im_end|>` or
    `<image>` encodes as those characters (a question cannot forge a turn, an answer cannot
    smuggle one into the trained tokens); only the chat renderer places control tokens, by id."""

    def __init__(self, tk: HFTokenizer):
        tk.add_special_tokens([t for t in SPECIAL_TOKENS if tk.token_to_id(t) is None])
        tk.encode_special_tokens = True  # not saved in tokenizer.json: set on every load
        self.tk = tk
        ids = [tk.token_to_id(t) for t in SPECIAL_TOKENS]
        self.special = SpecialIds(*ids)
        self._newline = self.encode("\n")

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def newline(self) -> list[int]:
        return self._newline

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids if text else []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, i: int) -> str:
        return self.tk.id_to_token(i) or f"<{i}>"

    def save(self, folder: str | Path) -> None:
        self.tk.save(str(Path(folder) / "tokenizer.json"))

    def to_str(self) -> str:
        """The tokenizer.json text (what `from_str` reads back)."""
        return self.tk.to_str()

    @classmethod
    def from_str(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    @classmethod
    def load(cls, folder: str | Path) -> "Tokenizer":
        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        with naming(path):
            return cls(HFTokenizer.from_file(str(path)))


def _byte_level_base() -> HFTokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def byte_level() -> Tokenizer:
    """256 byte tokens + the specials: needs no training, handles any text."""
    return Tokenizer(_byte_level_base())


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on `texts`; any text still encodes (byte fallback by construction)."""
    tk = HFTokenizer(models.BPE())
    # A word gets the same token wherever it stands ("red" as a whole answer and in "a red
    # circle" are one token), so what a caption teaches carries over to short answers.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk)

"""Training sets: LLaVA files -> validated, tokenized rows plus a bank of decoded images, and a
deterministic batch order.

The bad-record policy lives here: `error` stops at the first bad record with its id and the
problem; `skip` logs each skipped record and reports the count. Nothing is dropped silently.
`micro_batch(k)` is a pure function of (seed, k), which makes resuming exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from vitune.data.llava import Conversation, parse_record
from vitune.data.packing import pack_shared_prefix
from vitune.data.processor import (
    Batch,
    CaptionPairs,
    ImageTransform,
    collate,
    encode_caption,
    encode_conversation,
    encode_instructions,
    load_image,
    pad_instructions,
)
from vitune.data.tokenizer import IMAGE_SLOT, Tokenizer
from vitune.files import DataError, read_json_records

Policy = Literal["error", "skip"]
Log = Callable[[str], None]


@dataclass
class BadRecords:
    policy: Policy
    log: Log
    skipped: int = 0

    def handle(self, err: DataError) -> None:
        if self.policy == "error":
            raise err
        self.skipped += 1
        self.log(f"skipped bad record: {err}")


def load_conversations(path: str | Path, image_root: str | Path | None, bad: BadRecords,
                       allow_outside_root: bool = False) -> list[Conversation]:
    """The file's records as conversations; a bad one (also an id seen before in the file) goes to
    `bad`. A file without any record is an error naming it."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out, seen = [], set()
    records = read_json_records(path)
    if not records:
        raise DataError(f"{path}: holds no records")
    for i, rec in enumerate(records):
        try:
            conv = parse_record(rec, i, str(path), root, allow_outside_root=allow_outside_root)
            if conv.id in seen:
                raise DataError(f"{path}: record {conv.id!r}: duplicate id (record #{i}); ids must be unique in a file")
            seen.add(conv.id)
            out.append(conv)
        except DataError as e:
            bad.handle(e)
    return out


def conversation_texts(convs: list[Conversation]) -> list[str]:
    """All message texts with image slots removed: the corpus a from-scratch tokenizer learns."""
    return [m.text.replace(IMAGE_SLOT, " ") for c in convs for m in c.messages]


def mix_in(convs: list[Conversation], extra: list[Conversation], fraction: float) -> list[Conversation]:
    """`convs` plus `extra` cycled to make up `fraction` of the result (0: `extra` once each)."""
    if not extra or fraction <= 0:
        return convs + extra
    n = round(fraction / (1 - fraction) * len(convs))
    return convs + [extra[i % len(extra)] for i in range(n)]


@dataclass
class TrainSet:
    rows: list[tuple[list[int], list[int]]] = field(default_factory=list)
    images: list[list[int]] = field(default_factory=list)   # per row: indices into `bank`
    ids: list[str] = field(default_factory=list)
    bank: torch.Tensor | None = None                          # (n_unique, 3, S, S) uint8
    segments: list[list[int] | None] | None = None           # per row once packed (packing.py)
    instructions: list[list[list[int]]] | None = None         # per row, per image: instruction ids
    captions: list[list[int]] | None = None                   # per row: the caption ids of alignment

    def __len__(self) -> int:
        return len(self.rows)


def encode_trainset(
    convs: list[Conversation], tok: Tokenizer, template: str, transform: ImageTransform,
    n_image_tokens: int, max_len: int, bad: BadRecords, system_prompt: str = "", instruction_len: int = 0,
    caption_len: int = 0, name: str = "the training data",
) -> TrainSet:
    """`instruction_len > 0`: also each image's instruction ids, at most that many tokens;
    `caption_len > 0`: also each record's caption ids for the alignment loss."""
    ts = TrainSet(instructions=[] if instruction_len else None, captions=[] if caption_len else None)
    slots, decoded = {}, []
    for conv in convs:
        where = f"record {conv.id!r}"
        try:
            ids, labels = encode_conversation(tok, list(conv.messages), template, n_image_tokens, max_len, where,
                                              system_prompt, warn=bad.log)
            caption = encode_caption(tok, list(conv.messages), caption_len, where, bad.log) if caption_len else None
            idx = [_bank_slot(p, where, slots, decoded, transform) for p in conv.images]
        except DataError as e:
            bad.handle(e)
            continue
        if ts.captions is not None:
            ts.captions.append(caption)
        if ts.instructions is not None:
            ts.instructions.append(encode_instructions(tok, list(conv.messages), instruction_len, where, bad.log))
        ts.rows.append((ids, labels))
        ts.images.append(idx)
        ts.ids.append(conv.id)
    S = transform.size
    ts.bank = torch.stack(decoded) if decoded else torch.zeros(0, 3, S, S, dtype=torch.uint8)
    if not ts.rows:
        raise DataError(f"no usable records in {name} ({bad.skipped} skipped as bad in all)")
    return ts


def _bank_slot(path: Path, where: str, slots: dict, decoded: list, transform: ImageTransform) -> int:
    if path not in slots:
        decoded.append(transform.to_uint8(load_image(path, where)))
        slots[path] = len(decoded) - 1
    return slots[path]



class BatchOrder:
    """Micro-batch k of a seeded, per-epoch shuffle; a pure function of (seed, k).

    With `group_by_length`, each run of `GROUP` batches is cut from a length-sorted slice of the
    shuffle (then the batches are shuffled), so rows in a batch have similar lengths and padding
    (pure waste) shrinks, while every epoch still visits every row once.
    """

    GROUP = 16

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths, self.seed, self.group = lengths, seed, group_by_length
        self.n, self.bs = len(lengths), min(batch_size, len(lengths))
        self.per_epoch = max(1, self.n // self.bs)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()[: self.per_epoch * self.bs]
        if self.group:
            span = self.bs * self.GROUP
            perm = [i for c in range(0, len(perm), span)
                    for i in sorted(perm[c:c + span], key=lambda r: -self.lengths[r])]
        batches = [perm[j * self.bs:(j + 1) * self.bs] for j in range(self.per_epoch)]
        if self.group:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._batches(epoch))
        return self._epoch[1][j]


def make_batch(ts: TrainSet, rows: list[int], transform: ImageTransform, pad_id: int) -> Batch:
    img_idx = [i for r in rows for i in ts.images[r]]
    assert ts.bank is not None
    segments = None if ts.segments is None else [ts.segments[r] for r in rows]
    instr = None if ts.instructions is None else [x for r in rows for x in ts.instructions[r]]
    batch = collate([ts.rows[r] for r in rows], ts.bank[img_idx], transform, pad_id, segments, instr)
    if ts.captions is not None:
        batch.pairs = _caption_pairs(ts, rows, pad_id)
    return batch


def _caption_pairs(ts: TrainSet, rows: list[int], pad_id: int) -> CaptionPairs:
    assert ts.captions is not None
    ids, mask = pad_instructions([ts.captions[r] for r in rows], pad_id)
    first = torch.tensor([0] + [len(ts.images[r]) for r in rows[:-1]]).cumsum(0)  # row's first image in the batch
    group = torch.tensor([ts.images[r][0] for r in rows])  # bank slot: one per distinct image
    return CaptionPairs(ids, mask, first, group)


def pack_trainset(ts: TrainSet, max_len: int, image_id: int) -> TrainSet:
    """The same samples with each image's questions packed behind one shared prefix (packing.py).
    Instruction-conditioned image tokens cannot be shared (the config refuses that combination)."""
    if ts.captions is not None:
        raise ValueError("shared-prefix packing puts many captions in a row; alignment pairs one per row")
    if ts.instructions is not None:
        raise ValueError("shared-prefix packing shares image tokens that here depend on each question's instruction")
    rows, images, ids, segments = pack_shared_prefix(ts.rows, ts.images, ts.ids, max_len, image_id)
    return TrainSet(rows, images, ids, ts.bank, segments)

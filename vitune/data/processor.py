"""Processor: images -> pixel tensors, conversations -> token ids and labels, samples -> batches.

- `load_image` / `ImageTransform`: read (clear error for a missing or corrupt file), pad or squash
  to a square, resize, and store as uint8; `normalize` turns uint8 into model input.
- `encode_conversation`: render with the chat template, then fit to `max_seq_len` by cutting
  text only: never inside an image span. A record whose image tokens alone do not fit, or whose
  trained tokens would all be cut, is rejected with its id in the message.
- `encode_instructions`: each image's instruction as token ids (for instruction-conditioned fusions).
- `collate`: right-pads a list of samples into a `Batch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitune.config import VisionConfig
from vitune.conventions import IGNORE_INDEX, PAD_SEGMENT
from vitune.data.chat import Message, caption_text, image_instructions, render
from vitune.data.tokenizer import IMAGE_TOKEN, Tokenizer
from vitune.files import DataError


def load_image(path: str | Path, where: str = "") -> Image.Image:
    prefix = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{prefix}image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{prefix}unreadable or corrupt image {path}: {e}") from None


@dataclass(frozen=True)
class ImageTransform:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "pad"

    @classmethod
    def for_vision(cls, cfg: VisionConfig) -> "ImageTransform":
        return cls(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.resize)

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> `(3, S, S)` uint8."""
        if self.resize == "pad" and image.width != image.height:
            side = max(image.size)
            fill = tuple(int(255 * m) for m in self.mean)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 `(n, 3, S, S)` -> float `(n, 3, S, S)`."""
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, 3, self.size, self.size)
        return self.normalize(torch.stack([self.to_uint8(im) for im in images]))


def measure_stats(paths: list[Path], size: int, limit: int = 512) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) over the first `limit` distinct images."""
    unique = list(dict.fromkeys(paths))[:limit]
    if not unique:
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    raw = ImageTransform(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "squash")
    pixels = torch.stack([raw.to_uint8(load_image(p)) for p in unique]).float() / 255.0  # (n, 3, S, S)
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def fit_to_length(
    ids: list[int], labels: list[int], max_len: int, image_id: int, where: str
) -> tuple[list[int], list[int]]:
    """Cut text from the end to `max_len` tokens; never cut an image span, never leave no target."""
    image_pos = [i for i, t in enumerate(ids) if t == image_id]
    if len(image_pos) > max_len:
        raise DataError(f"{where}: its {len(image_pos)} image tokens alone exceed max_seq_len={max_len}")
    if len(ids) <= max_len:
        return ids, labels
    if image_pos and image_pos[-1] >= max_len:
        raise DataError(
            f"{where}: {len(ids)} tokens; cutting to max_seq_len={max_len} would cut into an image span "
            f"(its last image token is at position {image_pos[-1]}): shorten the text before the image"
        )
    ids, labels = ids[:max_len], labels[:max_len]
    if all(lab == IGNORE_INDEX for lab in labels[1:]):
        raise DataError(f"{where}: no trained (assistant) tokens remain after cutting to max_seq_len={max_len}")
    return ids, labels


def encode_conversation(
    tok: Tokenizer, messages: list[Message], template: str, n_image_tokens: int, max_len: int,
    where: str, system_prompt: str = "",
) -> tuple[list[int], list[int]]:
    r = render(tok, messages, template, n_image_tokens, system_prompt=system_prompt)
    if all(lab == IGNORE_INDEX for lab in r.labels):
        raise DataError(f"{where}: no assistant turn to train on")
    return fit_to_length(r.input_ids, r.labels, max_len, tok.special.image, where)


def encode_instructions(tok: Tokenizer, messages: list[Message], max_len: int, where: str,
                        warn: Callable[[str], None]) -> list[list[int]]:
    """Token ids of each image's instruction: `im_start` (so none is empty) + the text, cut to
    `max_len` tokens with a warning that names the record (never silently)."""
    return [_encode_text(tok, t, max_len, f"{where}: instruction", "instruction encoder", warn)
            for t in image_instructions(messages)]


def _encode_text(tok: Tokenizer, text: str, max_len: int, what: str, encoder: str,
                 warn: Callable[[str], None]) -> list[int]:
    """`im_start` + the text's ids, cut to `max_len` with a warning (`what` names the record)."""
    ids = [tok.special.im_start] + tok.encode(text)
    if len(ids) > max_len:
        warn(f"{what} of {len(ids)} tokens cut to the {encoder}'s max_len={max_len}")
        ids = ids[:max_len]
    return ids


def encode_caption(tok: Tokenizer, messages: list[Message], max_len: int, where: str,
                   warn: Callable[[str], None]) -> list[int]:
    """Token ids of the text paired with a record's image for alignment (`caption_text`), cut to
    `max_len` with a warning naming the record; a record without an image or an answer is refused."""
    text = caption_text(messages)
    if text is None or not any(IMAGE_TOKEN in m.text for m in messages):
        raise DataError(f"{where}: an alignment (contrastive) stage needs an image and an answer in every record")
    return _encode_text(tok, text, max_len, f"{where}: caption", "text encoder", warn)


def pad_instructions(instructions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids `(n, L)` right-padded with `pad_id`, mask `(n, L)` True on real tokens)."""
    L = max((len(x) for x in instructions), default=1)
    ids = torch.full((len(instructions), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(instructions), L, dtype=torch.bool)
    for i, x in enumerate(instructions):
        ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x, dtype=torch.long), True
    return ids, mask


@dataclass
class Batch:
    input_ids: torch.Tensor      # (B, T)
    labels: torch.Tensor         # (B, T)
    pixel_values: torch.Tensor   # (n_img, 3, S, S): the images of all rows, in order
    n_targets: int               # trained tokens in this batch (after the shift)
    segments: torch.Tensor | None = None  # (B, T) when a row is packed (data/packing.py); padding PAD_SEGMENT
    instructions: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, mask) (n_img, L), one per image
    pairs: CaptionPairs | None = None  # alignment: one (image, caption) pair per row

    def to(self, device: torch.device | str) -> "Batch":
        segments = None if self.segments is None else self.segments.to(device)
        instr = None if self.instructions is None else tuple(x.to(device) for x in self.instructions)
        pairs = None if self.pairs is None else self.pairs.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), self.pixel_values.to(device), self.n_targets,
                     segments, instr, pairs)


@dataclass
class CaptionPairs:
    """Row i's caption and its first image, for the alignment loss."""

    ids: torch.Tensor        # (B, L) caption ids, right-padded
    mask: torch.Tensor       # (B, L) True on real tokens
    image: torch.Tensor      # (B,) index into Batch.pixel_values
    group: torch.Tensor      # (B,) equal for rows of the same image (not each other's negatives)

    def to(self, device: torch.device | str) -> "CaptionPairs":
        return CaptionPairs(self.ids.to(device), self.mask.to(device), self.image.to(device), self.group.to(device))


def collate(
    rows: list[tuple[list[int], list[int]]], images_uint8: torch.Tensor, transform: ImageTransform, pad_id: int,
    segments: list[list[int] | None] | None = None, instructions: list[list[int]] | None = None,
) -> Batch:
    """Right-pad `(ids, labels)` rows; `images_uint8` are the rows' images in row order.
    `segments` (per row, None for an unpacked row) are kept only when some row is packed;
    `instructions` (one per image, in order) are padded into `Batch.instructions`."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    instr = None if instructions is None else pad_instructions(instructions, pad_id)
    return Batch(input_ids, labels, transform.normalize(images_uint8), n_targets, _segment_tensor(rows, segments, T),
                 instr)


def _segment_tensor(rows, segments: list[list[int] | None] | None, T: int) -> torch.Tensor | None:
    if segments is None or all(s is None for s in segments):
        return None
    out = torch.full((len(rows), T), PAD_SEGMENT, dtype=torch.long)  # padding: a segment of its own
    for i, ((ids, _), seg) in enumerate(zip(rows, segments)):
        out[i, : len(ids)] = 0 if seg is None else torch.tensor(seg)  # unpacked: all prefix, i.e. causal
    return out

"""Processor: images -> pixel tensors, conversations -> token ids and labels, samples -> batches.

- `load_image` / `ImageTransform`: read one image as RGB (EXIF orientation applied, 16-bit and
  float scaled to 8 bits, transparency composited on white, a pixel cap checked before decoding,
  multi-frame files refused; any bad file a `DataError` naming it and its record), pad or squash
  to a square, resize, and store as uint8; `normalize` turns uint8 into model input.
- `encode_conversation`: render with the chat template, then fit to `max_seq_len` by cutting
  text only: never inside an image span. A record whose image tokens alone do not fit, or whose
  trained tokens would all be cut, is rejected with its id in the message.
- `encode_instructions`: each image's instruction as token ids (for instruction-conditioned fusions).
- `collate`: right-pads a list of samples into a `Batch`.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vitune.config import VisionConfig
from vitune.conventions import IGNORE_INDEX, PAD_SEGMENT
from vitune.data.chat import Message, caption_text, image_instructions, render
from vitune.data.tokenizer import IMAGE_SLOT, Tokenizer
from vitune.files import DataError

MAX_IMAGE_PIXELS = 50_000_000  # width x height; checked from the header, before any pixel is decoded
MAX_PIXELS_ENV = "VITUNE_MAX_IMAGE_PIXELS"  # overrides MAX_IMAGE_PIXELS
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto

# What Pillow raises on a malformed file (beyond OSError, which covers truncation and unknown formats).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  ZeroDivisionError, struct.error)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def max_image_pixels() -> int:
    """The pixel cap: `$VITUNE_MAX_IMAGE_PIXELS` when set, else `MAX_IMAGE_PIXELS`. A bad setting is
    a `ValueError` (a configuration mistake, not a bad record: no skip policy swallows it)."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_IMAGE_PIXELS
    try:
        cap = int(raw.replace("_", ""))
    except ValueError:
        cap = 0
    if cap <= 0:
        raise ValueError(f"environment variable {MAX_PIXELS_ENV}={raw!r}: expected a positive whole number of "
                         f"pixels (width x height), e.g. {MAX_PIXELS_ENV}=100000000; the default is {MAX_IMAGE_PIXELS}")
    return cap


def load_image(path: str | Path, where: str = "") -> Image.Image:
    """The image at `path` as an RGB PIL image, decoded the way it displays, or a `DataError` that
    names the file (prefixed by `where`, e.g. "record 'abc'") and what is wrong with it.

    - EXIF orientation is applied (a phone photo stored sideways comes out upright).
    - Pixel cap: an image over `max_image_pixels()` pixels (default `MAX_IMAGE_PIXELS`, raise it with
      `$VITUNE_MAX_IMAGE_PIXELS`) is refused from its header, before decoding; so is anything over
      Pillow's own decompression-bomb limit.
    - Multi-frame files (animated GIF / WebP / PNG, multi-page TIFF) are refused: vitune reads
      single-frame images; save the frame you mean as its own file.
    - Transparency (RGBA, LA, PA, a palette or colour with a transparency entry) is alpha-composited
      onto white `BACKGROUND` = (255, 255, 255), never dropped (dropping exposes whatever colour the
      transparent pixels happen to store).
    - 16-bit images (I;16*, and 32-bit "I" whose values fit 0..65535) are scaled to 8 bits
      (v * 255 / 65535, rounded); other "I" images are stretched min..max to 0..255.
      Float ("F") images: values within [0, 1] are intensities (x 255), else within [0, 255] 8-bit
      levels, else stretched min..max to 0..255; NaN or infinite pixels are refused.
    - 1-bit, L, P, CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB.
    - A missing file, a folder, an empty, truncated or corrupt file, or a non-image: `DataError`.
    """
    prefix = f"{where}: " if where else ""
    cap = max_image_pixels()  # outside the try: a bad setting is not a bad image
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{prefix}image path is a folder, not an image file: {path}")
    try:
        if p.is_file() and p.stat().st_size == 0:
            raise DataError(f"{prefix}unreadable or corrupt image {path}: the file is empty (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our cap, below, decides
            im = Image.open(path)
            with im:
                _check_header(im, path, prefix, cap)
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im), path, prefix)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{prefix}image not found: {path}") from None
    except PermissionError:
        raise DataError(f"{prefix}image {path} cannot be read: permission denied") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{prefix}image {path} is too large to decode safely: {e} vitune's cap is {cap:,} pixels "
                        f"(${MAX_PIXELS_ENV}); Pillow's own limit (PIL.Image.MAX_IMAGE_PIXELS) applies as well; "
                        "shrink the image") from None
    except UnidentifiedImageError:
        raise DataError(f"{prefix}unreadable or corrupt image {path}: not an image in a format Pillow "
                        "recognises") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"{prefix}unreadable or corrupt image {path}: {type(e).__name__}: {e}") from None


def _check_header(im: Image.Image, path, prefix: str, cap: int) -> None:
    """What the header alone tells: the size against the cap, and the frame count."""
    w, h = im.size
    if w * h > cap:
        raise DataError(f"{prefix}image {path} is {w}x{h} = {w * h:,} pixels, over vitune's cap of {cap:,} pixels "
                        f"(a guard against decompression bombs); shrink the image, or raise the cap with the "
                        f"environment variable {MAX_PIXELS_ENV}=<pixels>")
    if w == 0 or h == 0:
        raise DataError(f"{prefix}unreadable or corrupt image {path}: it has no pixels ({w}x{h})")
    n = getattr(im, "n_frames", 1)
    if n > 1:
        raise DataError(f"{prefix}image {path} has {n} frames (an animation or a multi-page file); vitune reads "
                        "single-frame images only: save the frame you mean as its own image file")


def _to_rgb(im: Image.Image, path, prefix: str) -> Image.Image:
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        return _deep_to_rgb(im, path, prefix)
    if im.mode == "1" and "transparency" in im.info:  # Pillow's 1 -> RGBA ignores it
        t = im.info["transparency"]
        im = im.convert("L")
        im.info["transparency"] = 255 if t else 0
    if im.mode == "La":  # premultiplied; Pillow converts it only to LA
        im = im.convert("LA")
    has_alpha = (im.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in im.info
                 or (im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"))
    if not has_alpha:
        return im if im.mode == "RGB" else im.convert("RGB")
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")


def _deep_to_rgb(im: Image.Image, path, prefix: str) -> Image.Image:
    """16-bit, 32-bit integer and float images -> 8-bit RGB (the rules are in `load_image`)."""
    a = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(a).all():
            raise DataError(f"{prefix}image {path}: a float image with NaN or infinite pixel values")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 1:
            gray = np.rint(a * 255.0)
        elif lo >= 0 and hi <= 255:
            gray = np.rint(a)
        else:
            gray = _stretch(a, lo, hi)
    else:
        lo, hi = int(a.min()), int(a.max())
        if im.mode in _SIXTEEN_BIT or (lo >= 0 and hi <= 65535):
            gray = (a.astype(np.uint32) * 255 + 32767) // 65535
        else:
            gray = _stretch(a, lo, hi)
    rgb = np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    t = im.info.get("transparency")
    if isinstance(t, (int, float)) and not isinstance(t, bool):  # PNG tRNS: one fully transparent value
        rgb[a == t] = BACKGROUND
    return Image.fromarray(rgb)


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """min..max -> 0..255 (a constant image: its value clipped to 0..255)."""
    if hi == lo:
        return np.clip(np.full(a.shape, lo, dtype=np.float64), 0, 255).round()
    return np.rint((a.astype(np.float64) - lo) * (255.0 / (hi - lo)))


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
    """Per-channel mean and std (in [0, 1] units) over the first `limit` distinct readable images
    (an unreadable one is left out here: encoding its record reports it, by the bad-record policy)."""
    raw = ImageTransform(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "squash")
    decoded = []
    for p in dict.fromkeys(paths):
        if len(decoded) == limit:
            break
        try:
            decoded.append(raw.to_uint8(load_image(p)))
        except DataError:
            continue
    if not decoded:
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    pixels = torch.stack(decoded).float() / 255.0  # (n, 3, S, S)
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def fit_to_length(
    ids: list[int], labels: list[int], max_len: int, image_id: int, where: str,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[int], list[int]]:
    """Cut text from the end to `max_len` tokens, saying so through `warn`; never cut an image
    span, never leave no target."""
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
    n = len(ids)
    ids, labels = ids[:max_len], labels[:max_len]
    if all(lab == IGNORE_INDEX for lab in labels[1:]):
        raise DataError(f"{where}: no trained (assistant) tokens remain after cutting to max_seq_len={max_len}")
    if warn is not None:
        warn(f"warning: {where}: {n} tokens cut to max_seq_len={max_len} (its last {n - max_len} are not trained)")
    return ids, labels


def encode_conversation(
    tok: Tokenizer, messages: list[Message], template: str, n_image_tokens: int, max_len: int,
    where: str, system_prompt: str = "", warn: Callable[[str], None] | None = None,
) -> tuple[list[int], list[int]]:
    r = render(tok, messages, template, n_image_tokens, system_prompt=system_prompt)
    if all(lab == IGNORE_INDEX for lab in r.labels):
        raise DataError(f"{where}: no assistant turn to train on")
    return fit_to_length(r.input_ids, r.labels, max_len, tok.special.image, where, warn)


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
    if text is None or not any(IMAGE_SLOT in m.text for m in messages):
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

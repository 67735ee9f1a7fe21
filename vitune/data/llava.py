"""LLaVA conversation records -> typed `Conversation`s, with every record validated.

A record: `{"id", "image": path | "images": [paths] (optional), "conversations":
[{"from": "human" | "gpt" | "system", "value": str}, ...]}`. Paths resolve against `image_root`
(default: the data file's folder) and must stay inside it (absolute paths, `..` and symlinks that
lead outside are refused unless `allow_outside_root`). Errors name the record id and what is wrong
with it.
A human turn's `<image>` tags (LLaVA's convention) become image slots (`IMAGE_SLOT`); no other
text ever does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitune.data.chat import Message
from vitune.data.tokenizer import IMAGE_SLOT, IMAGE_TOKEN
from vitune.files import DataError

# LLaVA / ShareGPT role names -> ours (an explicit table; anything else is an error).
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[Message, ...]
    images: tuple[Path, ...]


def _image_paths(rec: dict, where: str, root: Path, allow_outside_root: bool = False) -> list[Path]:
    if "image" in rec and "images" in rec:
        raise DataError(f"{where}: has both 'image' and 'images'; use one")
    raw = rec.get("images", [rec["image"]] if "image" in rec else [])
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise DataError(f"{where}: 'image'/'images' must be a path or a list of paths, got {raw!r}")
    paths = [root / p for p in raw]
    for given, p in zip(raw, paths):
        if not allow_outside_root:
            _check_inside(given, p, root, where)
        if not p.is_file():
            raise DataError(f"{where}: image not found: {p}")
    return paths


def _check_inside(given: str, path: Path, root: Path, where: str) -> None:
    """`given` must be relative and `path` (= root / given), with symlinks and `..` resolved, inside
    the resolved `root`: a data file cannot point vitune at arbitrary files on the machine."""
    allow = ("pass --allow-outside-images (allow_outside_root=True) to allow images outside it, "
             "or point --image-root at a folder that holds them")
    if Path(given).anchor:
        raise DataError(f"{where}: image path {given!r} is absolute; image paths must be relative to the "
                        f"image root {root}; {allow}")
    resolved, top = path.resolve(), root.resolve()
    if not resolved.is_relative_to(top):
        raise DataError(f"{where}: image path {given!r} resolves to {resolved}, outside the image root {top}; "
                        f"{allow}")


def _messages(rec: dict, where: str) -> list[Message]:
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' is missing or empty")
    out: list[Message] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise DataError(f"{where}: turn {i} must be an object with a string 'value'")
        role = ROLES.get(t["from"]) if isinstance(t.get("from"), str) else None
        if role is None:
            raise DataError(f"{where}: turn {i} has unknown role {t.get('from')!r}; valid: {sorted(ROLES)}")
        if IMAGE_SLOT in t["value"]:
            raise DataError(f"{where}: turn {i} holds the character U+FFFC, which vitune reserves for image slots")
        if role != "user" and IMAGE_TOKEN in t["value"]:
            raise DataError(f"{where}: turn {i} ({role}) holds an {IMAGE_TOKEN} tag; images belong in human turns")
        out.append(Message(role, t["value"].replace(IMAGE_TOKEN, IMAGE_SLOT) if role == "user" else t["value"]))
    _check_order(out, where)
    return out


def _check_order(msgs: list[Message], where: str) -> None:
    body = msgs[1:] if msgs[0].role == "system" else msgs
    if not body:
        raise DataError(f"{where}: conversation has no user/assistant turns")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise DataError(f"{where}: wrong role order: turn {i + len(msgs) - len(body)} is {m.role!r}, expected {want!r} (turns alternate human, gpt)")
    if body[-1].role != "assistant":
        raise DataError(f"{where}: the last turn is from the human; nothing to train on")


def parse_record(rec: dict, index: int, source: str, image_root: Path,
                 allow_outside_root: bool = False) -> Conversation:
    raw_id = rec.get("id", f"#{index}")
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        raise DataError(f"{source}: record #{index}: 'id' must be a string or an integer, got {raw_id!r}")
    rid = str(raw_id)
    where = f"{source}: record {rid!r}"
    messages = _messages(rec, where)
    images = _image_paths(rec, where, image_root, allow_outside_root)
    n_tags = sum(m.text.count(IMAGE_SLOT) for m in messages)
    if n_tags != len(images):
        raise DataError(f"{where}: {n_tags} {IMAGE_TOKEN} tag(s) in the text but {len(images)} image(s)")
    return Conversation(rid, tuple(messages), tuple(images))

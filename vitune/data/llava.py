"""LLaVA conversation records -> typed `Conversation`s, with every record validated.

A record: `{"id", "image": path | "images": [paths] (optional), "conversations":
[{"from": "human" | "gpt" | "system", "value": str}, ...]}`. Paths resolve against `image_root`
(default: the data file's folder). Errors name the record id and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitune.data.chat import Message
from vitune.data.tokenizer import IMAGE_TOKEN
from vitune.files import DataError

# LLaVA / ShareGPT role names -> ours (an explicit table; anything else is an error).
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[Message, ...]
    images: tuple[Path, ...]


def _image_paths(rec: dict, where: str, root: Path) -> list[Path]:
    if "image" in rec and "images" in rec:
        raise DataError(f"{where}: has both 'image' and 'images'; use one")
    raw = rec.get("images", [rec["image"]] if "image" in rec else [])
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise DataError(f"{where}: 'image'/'images' must be a path or a list of paths, got {raw!r}")
    paths = [root / p for p in raw]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{where}: image not found: {p}")
    return paths


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
        out.append(Message(role, t["value"]))
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


def parse_record(rec: dict, index: int, source: str, image_root: Path) -> Conversation:
    rid = str(rec.get("id", f"#{index}"))
    where = f"{source}: record {rid!r}"
    messages = _messages(rec, where)
    images = _image_paths(rec, where, image_root)
    answered = [i for i, m in enumerate(messages) if m.role != "user" and IMAGE_TOKEN in m.text]
    if answered:
        raise DataError(f"{where}: turn {answered[0]} ({messages[answered[0]].role}) holds an {IMAGE_TOKEN} tag; "
                        "images belong in human turns")
    n_tags = sum(m.text.count(IMAGE_TOKEN) for m in messages)
    if n_tags != len(images):
        raise DataError(f"{where}: {n_tags} {IMAGE_TOKEN} tag(s) in the text but {len(images)} image(s)")
    return Conversation(rid, tuple(messages), tuple(images))

"""Files: atomic writes and line-checked JSON / JSONL reading.

Every output vitune writes (checkpoints, predictions, data sets) goes through `atomic_write_*`
or `atomic_dir`, so a crash never leaves a half-written file where a good one is expected.
Readers raise `DataError` naming the file and line of malformed input.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


class DataError(ValueError):
    """Bad input data: the message names the file, record or field at fault."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    The old folder (if any) is moved aside first and removed only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_records(path: str | os.PathLike) -> list[dict]:
    """Read a JSON list or a JSONL file of objects; errors name the file and line/index."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        where = [f"{path}: item {i}" for i in range(len(rows))]
    else:
        rows, where = [], []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: malformed JSON: {e.msg}") from None
            where.append(f"{path}: line {lineno}")
    for row, w in zip(rows, where):
        if not isinstance(row, dict):
            raise DataError(f"{w}: expected a JSON object, got {type(row).__name__}")
    return rows


@contextlib.contextmanager
def naming(path: str | Path):
    """Errors while reading `path` name it: a corrupt or truncated file becomes a DataError that
    says which file (missing files and DataErrors pass through as they are)."""
    try:
        yield
    except (FileNotFoundError, DataError):
        raise
    except Exception as e:  # the readers' own errors (json, safetensors, torch.load) name no file
        raise DataError(f"{path}: corrupt or unreadable ({type(e).__name__}: {e})") from e

"""Files: atomic writes and line-checked JSON / JSONL reading.

Every output vitune writes (checkpoints, predictions, data sets) goes through `atomic_write_*`
or `atomic_dir`, so a crash never leaves a half-written file where a good one is expected: the
data is fsynced before the rename, and a kill mid-swap is undone by `recover_dir`.
Readers raise `DataError` naming the file and line of malformed input.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


class DataError(ValueError):
    """Bad input data: the message names the file, record or field at fault."""


# Temporary files and folders are named `.NAME.vitune-PID-<random>.tmp`: the writer's pid says
# whether a leftover belongs to a process that is gone (killed mid-write) and may be removed.
TEMP_NAME = re.compile(r"^\..+\.vitune-(\d+)-\w+\.tmp$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.vitune-{os.getpid()}-"


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Remove the temporary files and folders that writers killed mid-write left in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = TEMP_NAME.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file under `folder` and the folders themselves reach the disk."""
    for p in sorted(folder.rglob("*"), reverse=True):
        _fsync(p)
    _fsync(folder)


def _old_copy(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(path: str | os.PathLike) -> None:
    """Undo what a kill in the middle of `atomic_dir` left behind: put the previous copy back if
    the new one never arrived, delete a previous copy that is no longer needed, and remove the
    temporary files and folders of writers that are gone (their pid is in the name)."""
    path = Path(path)
    old = _old_copy(path)
    if old.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    remove_stale_temps(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`.

    The new folder is written and fsynced in full first. The swap is two renames (the old folder
    to `.NAME.old`, then the new one to NAME); a kill between them leaves the old copy, which
    `recover_dir` (run by every reader and writer of such a folder) puts back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = _old_copy(path)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_creatable(path: Path, what: str) -> None:
    """`path` can be created: its nearest existing ancestor is a folder we may write in (`what`
    names the path in the error, e.g. "--out runs/x")."""
    folder = path.resolve().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{what}: cannot create it: {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{what}: cannot write in {folder} (permission denied)")


def check_output_dir(out: str | os.PathLike, overwrite: bool, inputs: dict[str, str | os.PathLike]) -> Path:
    """Before any work: `out` is a folder vitune may create or (`overwrite`) replace, and holds
    none of the `inputs` (name -> path) nor lies inside one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    for name, path in inputs.items():
        p = Path(path).resolve()
        o = out.resolve()
        if o == p or o in p.parents or p in o.parents:
            raise DataError(f"{out}: is (or contains, or lies inside) the {name} {path}; write to another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: exists and is not empty; pass --overwrite to replace it, or choose another folder")
    return out


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

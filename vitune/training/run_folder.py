"""The training output folder: what may be written into it, and whether a resume fits it.

    OUT/{config.yaml, metrics.jsonl, state/, model/, tensorboard/}

- `check_out`: before any work, an OUT holding an earlier run is refused unless the call says
  `resume` (continue it) or `overwrite` (start afresh: `clear_run` then removes the old files).
- `data_fingerprints`: a SHA-256 of each stage's data files, saved with the state.
- `check_resume`: the saved config and data against the new ones; every differing field is named.
  Fields that do not change what is computed (threads, logging, save intervals, device, the
  bad-record policy, DDP or FSDP) may differ; anything else needs `allow_change`.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from vitune.config import Config, ConfigError, to_dict
from vitune.files import recover_dir

RUN_FILES = ("config.yaml", "metrics.jsonl", "state", "model", "tensorboard")
HARMLESS = frozenset({"train.threads", "train.log_every", "train.save_every", "train.save_every_minutes",
                      "train.device", "train.on_bad_record", "train.distributed"})


def earlier_run(out: Path) -> list[str]:
    for name in ("state", "model"):
        recover_dir(out / name)
    return [name for name in RUN_FILES if (out / name).exists()]


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume continues the run in OUT, --overwrite starts afresh: give one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    found = earlier_run(out) if out.is_dir() else []
    if found and not (resume or overwrite):
        raise ConfigError(f"--out {out} holds an earlier run ({', '.join(found)}): pass --resume to continue it, "
                          "--overwrite to start afresh, or another --out")


def clear_run(out: Path) -> None:
    """Remove an earlier run's files (only those vitune writes), for `overwrite`."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprints(cfg: Config, data: dict[str, str]) -> dict[str, str]:
    """Stage name -> SHA-256 over its data file and mix files, in order."""
    out = {}
    for s in cfg.train.stages:
        files = [data.get(s.name) or s.data, *s.mix_data]
        out[s.name] = hashlib.sha256("".join(_sha256(Path(f)) for f in files).encode()).hexdigest()
    return out


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    if isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        return {k: v for i, val in enumerate(node) for k, v in _flat(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: node}


def config_changes(saved: Config, new: Config) -> list[str]:
    """`field: saved -> new` for every field that differs, harmless ones left out."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(new))
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in HARMLESS and a.get(k, "(absent)") != b.get(k, "(absent)")]
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys]


def check_resume(saved: Config, saved_data: dict[str, str] | None, new: Config, new_data: dict[str, str],
                 allow_change: bool, where: Path) -> list[str]:
    """Raise ConfigError naming every difference unless `allow_change`; returns the differences."""
    diffs = config_changes(saved, new)
    if saved_data is not None:
        diffs += [f"data of stage {name!r}: not the data the run was trained on (SHA-256 differs)"
                  for name in new_data if saved_data.get(name) != new_data[name]]
    if diffs and not allow_change:
        raise ConfigError(f"--resume: the run in {where} was saved with another config or data:\n  "
                          + "\n  ".join(diffs) + "\npass the same ones, or --allow-config-change to resume anyway")
    return diffs

"""Metrics log: one JSON line per training step in OUT/metrics.jsonl (and TensorBoard if installed).

On resume, lines past the resumed step are dropped first, so the log never holds steps that the
saved state does not include; a row half-written by a crash is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitune.files import DataError, atomic_write_text


class MetricsLog:
    def __init__(self, out: Path, truncate_after: int = 0):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        kept = [r for r in read_metrics(self.path) if r["global_step"] <= truncate_after] if truncate_after else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.f = self.path.open("a")
        self.tb = _tensorboard(out)

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{row['stage']}/{k}", v, row["global_step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The logged rows. A last line without its newline is a row cut by a crash mid-write: it is
    dropped (it lies past any saved state); any other bad line is an error naming file and line."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # the unterminated tail of an interrupted write
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i}: malformed JSON: {e.msg}") from None
    return rows


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))

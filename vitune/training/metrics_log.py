"""Metrics log: one JSON line per training step in OUT/metrics.jsonl (and TensorBoard if installed).

On resume, lines past the resumed step are dropped first, so the log never holds steps that the
saved state does not include.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitune.files import atomic_write_text


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
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))

"""The plots of an evaluation folder, as PNG files (matplotlib's Agg canvas, no display needed;
matplotlib is imported only when a plot is drawn):
- `per_category_plot`: accuracy per category (and overall) with its 95 % Wilson interval;
- `confusion_plot`: counts of (reference answer, predicted answer), for closed-vocabulary sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vitune.evaluation.intervals import Accuracy

_METADATA = {"Software": None}  # no version string in the file: the same plot gives the same bytes


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def per_category_plot(path: str | Path, rows: Sequence[tuple[str, Accuracy]], title: str) -> Path:
    """One bar per (label, accuracy), in percent, with asymmetric error bars: the Wilson interval."""
    labels = [label for label, _ in rows]
    values = [100 * a.value for _, a in rows]
    low = [max(0.0, 100 * (a.value - a.interval[0])) for _, a in rows]  # rounding can put a bound past the value
    high = [max(0.0, 100 * (a.interval[1] - a.value)) for _, a in rows]
    fig = _figure(max(4.0, 0.8 * len(rows) + 1.5), 3.6)
    ax = fig.add_subplot()
    colors = ["#4c72b0"] * (len(rows) - 1) + ["#333333"] if labels and labels[-1] == "overall" else None
    ax.bar(range(len(rows)), values, yerr=[low, high], capsize=4, color=colors)
    ax.set_xticks(range(len(rows)), [f"{label}\nn={a.n}" for label, a in rows], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_METADATA)
    return Path(path)


def confusion_plot(path: str | Path, references: Sequence[str], predicted: Sequence[str], labels: Sequence[str],
                   title: str) -> Path:
    """A count matrix: rows the reference answers (`labels`), columns the predicted answers
    (`labels` and, where they occur, whatever `predicted` holds beyond them, in order given)."""
    import numpy as np
    columns = list(labels) + [p for p in dict.fromkeys(predicted) if p not in labels]
    row_of = {a: i for i, a in enumerate(labels)}
    col_of = {a: i for i, a in enumerate(columns)}
    counts = np.zeros((len(labels), len(columns)), dtype=np.int64)
    for r, p in zip(references, predicted, strict=True):
        counts[row_of[r], col_of[p]] += 1
    size = 0.35 * max(len(labels), len(columns)) + 2.5
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted answer")
    ax.set_ylabel("reference answer")
    ax.set_title(title, fontsize=10)
    if len(labels) * len(columns) <= 900:
        top = counts.max() or 1
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if counts[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_METADATA)
    return Path(path)

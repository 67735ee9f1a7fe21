"""`vitune eval --compare RUN_A RUN_B`: two results folders side by side (`compare_runs`).

Per category and overall with n and 95 % intervals, and whether the overall difference is larger
than the noise (paired on the questions both scored). Runs of different benchmarks, tasks,
question sets or reference answers are refused, and so are retrieval runs (no per-query ranks) and caption runs (corpus-level metrics).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitune.evaluation.intervals import Accuracy, compare
from vitune.evaluation.results import RESULTS, RESULTS_FORMAT, SCORES
from vitune.evaluation.runner import CAPTION, RETRIEVAL
from vitune.files import DataError, read_json_records


def _load_run(folder: str | Path) -> tuple[dict, dict]:
    folder = Path(folder)
    path = folder / RESULTS
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; --compare takes two results folders of `vitune eval --out`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: holds no {RESULTS}; --compare takes two results folders of `vitune eval "
                        "--out`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise DataError(f"{path}: not a vitune results file (format {RESULTS_FORMAT!r})")
    if results.get("task") == RETRIEVAL:
        raise DataError(f"{folder}: a retrieval run; --compare pairs per-question scores, and a retrieval run stores "
                        f"only its Recall@K (no per-query ranks): compare the two {RESULTS} metrics by hand")
    if results.get("task") == CAPTION:
        raise DataError(f"{folder}: a caption run; --compare pairs per-question scores, and caption metrics are "
                        f"corpus-level (no per-image scores): compare the two {RESULTS} metrics by hand")
    scores = {}
    for row in read_json_records(folder / SCORES):
        scores[row["question_id"]] = float(row["score"])
    return results, scores


def _identity(r: dict) -> list[tuple[str, Any]]:
    bench = r["bench"]
    return [("benchmarks", bench["name"] if bench else None),
            ("bench parameters", bench["params"] if bench else None),
            ("tasks", r["task"]),
            ("question sets", r["data"]["questions"]["sha256"]),
            ("reference answers", r["data"]["answers"]["sha256"])]


def _what(r: dict, key: str) -> str:
    if key in ("question sets", "reference answers"):
        d = r["data"]["questions" if key == "question sets" else "answers"]
        return f"{d['path']} (SHA-256 {d['sha256'][:12]}…)"
    value = dict(_identity(r))[key]
    return "no bench (user files)" if value is None else str(value)


def compare_runs(a: str | Path, b: str | Path) -> str:
    """Two results folders side by side (overall and per category, with n and 95 % CI) and whether
    the overall difference is larger than the noise (`intervals.compare`, paired on the questions
    both scored). Runs of different benchmarks or question sets are refused, saying how they differ."""
    ra, sa = _load_run(a)
    rb, sb = _load_run(b)
    for (key, va), (_, vb) in zip(_identity(ra), _identity(rb), strict=True):
        if va != vb:
            raise DataError(f"cannot compare {a} and {b}: they are runs of different {key} ({_what(ra, key)} vs "
                            f"{_what(rb, key)}); a comparison needs the same questions and answers")
    c = compare(sa, sb)

    def cell(m: Mapping | None) -> str:
        return str(Accuracy(m["correct"], m["n"])) if m else "-"

    cats = sorted(set(ra["per_category"]) | set(rb["per_category"]))
    rows = [(k, cell(ra["per_category"].get(k)), cell(rb["per_category"].get(k))) for k in cats]
    rows.append(("overall", cell(ra["metrics"]), cell(rb["metrics"])))
    width = max(len("category"), *(len(r[0]) for r in rows))
    wa = max(len(f"A: {a}"), *(len(r[1]) for r in rows))
    lines = [f"{'category':<{width}}  {'A: ' + str(a):<{wa}}  B: {b}"]
    lines += [f"{k:<{width}}  {x:<{wa}}  {y}" for k, x, y in rows]
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    p = f"; exact McNemar p = {c.p_value:.3g} ({c.only_a} right in A only, {c.only_b} in B only)" \
        if c.p_value is not None else ""
    lines.append(f"difference B - A: {100 * c.difference:+.1f} points on the {c.n} questions both scored, 95 % CI "
                 f"{100 * c.low:+.1f} to {100 * c.high:+.1f} (paired bootstrap){p}")
    if c.n_only_in_a or c.n_only_in_b:
        lines.append(f"not paired: {c.n_only_in_a} question(s) scored only in A, {c.n_only_in_b} only in B")
    lines.append("significant: yes, the difference is larger than the noise (its 95 % interval excludes 0)"
                 if c.significant else
                 "significant: no, the difference is within the noise (its 95 % interval includes 0)")
    return "\n".join(lines)

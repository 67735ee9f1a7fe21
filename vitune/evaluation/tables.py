"""The tables `vitune eval` prints: accuracy per category (POPE's metrics added; multiple choice:
the unparseable answers), Recall@K, and the caption metrics.

`_pct` and `_ci` (percentages and 95 % intervals) are shared with the Markdown report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vitune.evaluation.intervals import Accuracy
from vitune.evaluation.metrics import _ids, coverage_lines, format_table
from vitune.evaluation.runner import ChoiceEvaluation, Evaluation, PopeEvaluation


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(m: Mapping) -> str:
    lo, hi = m["ci95"]
    return f"{_pct(lo)}-{_pct(hi)}"


def _pope_table(results: dict) -> str:
    rows = [*results["per_category"].items(), ("overall", results["metrics"])]
    width = max(len("sampling"), *(len(c) for c, _ in rows))
    head = f"{'sampling':<{width}}  {'n':>6}  {'accuracy':>8}  {'95 % CI':<11}  {'precision':>9}  {'recall':>6}  " \
           f"{'F1':>5}  {'yes-ratio':>9}  {'unparseable':>11}"
    lines = [head]
    for c, m in rows:
        if c == "overall":
            lines.append("-" * len(head))
        lines.append(f"{c:<{width}}  {m['n']:>6}  {_pct(m['accuracy']):>7}%  {_ci(m):<11}  {_pct(m['precision']):>8}%  "
                     f"{_pct(m['recall']):>5}%  {_pct(m['f1']):>4}%  {_pct(m['yes_ratio']):>8}%  "
                     f"{m['n_unparseable']:>11}")
    return "\n".join(lines)


def _table(evaluation: Evaluation, results: dict) -> str:
    name = results["bench"]["name"] if results["bench"] else results["data"]["questions"]["path"]
    head = f"{results['task']} on {name}: {Accuracy(results['metrics']['correct'], results['metrics']['n'])}"
    if isinstance(evaluation, PopeEvaluation):
        body = _pope_table(results) + "".join(f"\n{line}" for line in coverage_lines(evaluation.result))
    else:
        body = format_table(evaluation.result if isinstance(evaluation, ChoiceEvaluation) else evaluation,
                            intervals=True)
    if isinstance(evaluation, ChoiceEvaluation) and evaluation.unparseable:
        body += f"\n{len(evaluation.unparseable)} answer(s) name no single option letter ({evaluation.letters}) and " \
                f"count as wrong: {_ids(evaluation.unparseable)}"
    skipped = results["coverage"]["n_skipped"]
    if skipped:
        body += f"\n{skipped} question(s) skipped as bad records (see {results['coverage']['skipped_file']}): no " \
                "prediction, counted as wrong"
    return f"{head}\n{body}"


def _retrieval_rows(results: Mapping[str, Any]) -> list[tuple[str, int, dict[str, float]]]:
    m = results["metrics"]
    return [("image -> text", m["n_i2t"], m["i2t"]), ("text -> image", m["n_t2i"], m["t2i"])]


def _retrieval_table(results: Mapping[str, Any]) -> str:
    m = results["metrics"]
    name = results["bench"]["name"] if results["bench"] else results["data"]["captions"]["path"]
    ks = list(m["i2t"])
    lines = [(f"retrieval on {name}: {m['n_images']} images, {m['n_captions']} captions "
              f"({results['protocol']['captions_per_image']:g} per image)"),
             f"{'direction':<13}  {'n':>6}  " + "  ".join(f"{k:>6}" for k in ks)]
    for label, n, recall in _retrieval_rows(results):
        lines.append(f"{label:<13}  {n:>6}  " + "  ".join(f"{_pct(v):>5}%" for v in recall.values()))
    return "\n".join(lines)


def _caption_table(results: Mapping[str, Any]) -> str:
    """The caption metrics (x100 as papers print them; CIDEr too), then coverage."""
    m, cov = results["metrics"], results["coverage"]
    name = results["bench"]["name"] if results["bench"] else results["data"]["captions"]["path"]
    lines = [f"caption on {name}: {m['n']} images, {results['data']['captions']['n']} reference captions",
             f"{'metric':<8}  {'score':>6}"]
    lines += [f"{k:<8}  {'-' if v is None else f'{100 * v:.1f}':>6}" for k, v in m.items() if k != "n"]
    return "\n".join(lines + _caption_coverage(cov))


def _caption_coverage(cov: Mapping[str, Any]) -> list[str]:
    lines = []
    if cov["n_missing"]:
        lines.append(f"{cov['n_missing']} of {cov['n_scored']} images have no caption and are scored as an empty one: "
                     f"{_ids(cov['missing'])}")
    if cov["n_extra"]:
        lines.append(f"{cov['n_extra']} prediction(s) for ids that are no image of the captions file, not scored: "
                     f"{_ids(cov['extra'])}")
    if cov["n_empty"]:
        lines.append(f"{cov['n_empty']} caption(s) are empty (after tokenisation) and scored as given")
    if cov["n_skipped"]:
        lines.append(f"{cov['n_skipped']} image(s) skipped as bad records (see {cov['skipped_file']}): scored as an "
                     "empty caption")
    return lines

"""A retrieval evaluation into its results folder (`_run_retrieval`; `_check_retrieval` first).

Retrieval (`task="retrieval"`: the bench shapes-retrieval, or a `captions` file of
{"image", "caption"} rows) has no predictions: `runner.eval_retrieval` embeds the images and
captions with the model's alignment head, and the folder gets only results.json (its "metrics":
"i2t" and "t2i", each {"R@1", "R@5", "R@10"} as fractions, with "n_images", "n_captions", "n_i2t",
"n_t2i"; the "protocol"; the model and captions SHA-256) and report.md. Per-query ranks are not
stored, so `compare.compare_runs` refuses retrieval runs.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import vitune
from vitune.evaluation.partial import partial_path
from vitune.evaluation.report import render_report
from vitune.evaluation.results import (
    PREDICTIONS,
    REPORT,
    RESULTS,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    WRITTEN,
    EvalOutcome,
    EvalSpec,
    _model_record,
    sha256,
)
from vitune.evaluation.runner import RETRIEVAL, eval_retrieval
from vitune.evaluation.tables import _retrieval_table
from vitune.files import DataError, atomic_write_json, atomic_write_text


def _check_retrieval(spec: EvalSpec) -> None:
    """What a retrieval evaluation takes: a model, a bench or a captions file, and nothing else."""
    if spec.predictions:
        raise DataError("retrieval ranks a model's image and caption embeddings: there are no predictions to score; "
                        "give --model DIR instead of --predictions")
    if not spec.model:
        raise DataError("retrieval needs a model with an alignment head: give --model DIR")
    if spec.questions or spec.answers:
        raise DataError(f"--task {RETRIEVAL} reads a captions file, not questions and answers: give --captions FILE "
                        '(JSONL rows {"image": PATH, "caption": TEXT}) instead of --questions / --answers')
    if spec.bench and (spec.captions or spec.image_root):
        raise DataError(f"--bench {spec.bench} brings its own captions and images: drop --captions and --image-root")
    if not (spec.bench or spec.captions):
        raise DataError(f"--task {RETRIEVAL} needs --bench shapes-retrieval or --captions FILE")
    if spec.precision != "fp32":
        raise DataError(f"--precision {spec.precision}: retrieval embeds in fp32 only")
    if spec.quantize:
        raise DataError(f"--quantize {spec.quantize}: retrieval embeds with the float model only (quantisation is "
                        "for the LM's decoding)")
    if spec.on_bad_record != "error":
        raise DataError("--on-bad-record skip does not apply to retrieval: a skipped image would change the gallery "
                        "every caption is ranked against; fix or remove its rows")


def _recall(recall: Mapping[int, float]) -> dict[str, float]:
    return {f"R@{k}": v for k, v in recall.items()}


def _run_retrieval(spec: EvalSpec, bench, captions: str | None, image_root: str | None, t0: float, created: str,
                   log: Callable[[str], None]) -> EvalOutcome:
    """A retrieval evaluation into results.json and report.md (module docstring)."""
    assert captions is not None and spec.model is not None
    t = time.perf_counter()
    ev = eval_retrieval(spec.model, captions, image_root, spec.batch_size, progress=spec.progress, log=log)
    embed_s = time.perf_counter() - t
    r = ev.result
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "format_version": RESULTS_VERSION, "vitune_version": vitune.__version__,
        "created": created, "command": shlex.join(spec.command) if spec.command else None, "task": RETRIEVAL,
        "bench": bench.record() if bench else None,
        "data": {"captions": {"path": str(Path(captions).resolve()), "sha256": sha256(captions), "n": ev.n_captions},
                 "image_root": str(Path(image_root or Path(captions).parent).resolve()), "n_images": r.n_images},
        "model": _model_record(spec.model),
        "protocol": {"similarity": "cosine", "captions_per_image": round(ev.n_captions / r.n_images, 4),
                     "i2t_hit": "any of the image's captions among its K most similar captions",
                     "t2i_hit": "the caption's own image among its K most similar images",
                     "ties": "pessimistic: a correct item ranks after every wrong item as similar"},
        "embedding": {"batch_size": spec.batch_size, "precision": "fp32", "text_max_len": ev.text_max_len,
                      "n_captions_cut": ev.n_cut},
        "metrics": {"i2t": _recall(r.i2t), "t2i": _recall(r.t2i), "n_images": r.n_images,
                    "n_captions": ev.n_captions, "n_i2t": r.n_i2t, "n_t2i": r.n_t2i},
        "embed_time_s": round(embed_s, 3),
    }
    table = _retrieval_table(results)
    out = Path(spec.out) if spec.out else None
    written: list[Path] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in (*WRITTEN, partial_path(PREDICTIONS).name):  # an earlier run's (--overwrite)
            (out / name).unlink(missing_ok=True)
        results["files"] = {"report": REPORT}
        results["wall_time_s"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(out / RESULTS, results)
        atomic_write_text(out / REPORT, render_report(results))
        written = [out / RESULTS, out / REPORT]
        table += f"\nresults in {out}: {RESULTS}, {REPORT}"
    else:
        results["wall_time_s"] = round(time.perf_counter() - t0, 3)
    return EvalOutcome(results, table, ev, out, written)

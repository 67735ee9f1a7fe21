"""results.json and the results folder of `vitune eval`: their names, the spec and the outcome.

The file names a results folder holds (`WRITTEN`; `RESUMABLE`: what an interrupted run leaves,
which does not make the folder "non-empty"), `check_results_folder` (before any work: never an
input, refused when not empty unless `overwrite`), `EvalSpec` (what to evaluate) and `EvalOutcome`
(what came of it), and the parts of a results.json record: `sha256` of the files evaluated, the
model and decoding records, the metrics with n and 95 % Wilson intervals (overall and per
category, POPE's added), and the coverage. `evaluate.run_eval` puts them together.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitune.evaluation.answering import CAPTION_GENERATION, VQA_GENERATION
from vitune.evaluation.intervals import Accuracy
from vitune.evaluation.metrics import VQAResult, coverage_lines
from vitune.evaluation.partial import partial_path
from vitune.evaluation.pope import PopeResult
from vitune.evaluation.predict import PredictReport, errors_path, run_predict
from vitune.evaluation.runner import ChoiceEvaluation, Evaluation, PopeEvaluation, RetrievalEvaluation, vqa_result
from vitune.files import DataError, check_creatable
from vitune.inference.generate import GenerationConfig
from vitune.model.quant import QuantConfig

RESULTS_FORMAT = "vitune-eval-results"
RESULTS_VERSION = 1
PREDICTIONS, SCORES, RESULTS, REPORT = "predictions.jsonl", "scores.jsonl", "results.json", "report.md"
PER_CATEGORY_PNG, CONFUSION_PNG = "per_category.png", "confusion.png"
CAPTION_QUESTIONS = "caption_questions.jsonl"  # a caption run's questions: one per image
WRITTEN = (PREDICTIONS, SCORES, RESULTS, REPORT, PER_CATEGORY_PNG, CONFUSION_PNG, errors_path(PREDICTIONS).name,
           CAPTION_QUESTIONS)
# what an interrupted run leaves, which does not make the folder "non-empty"
RESUMABLE = frozenset({partial_path(PREDICTIONS).name, CAPTION_QUESTIONS})


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_results_folder(out: str | Path, overwrite: bool, files: Mapping[str, str | Path | None],
                         folders: Mapping[str, str | Path | None]) -> Path:
    """Before any work: `out` may be created or written: not a file, neither one of the input
    `files` nor holding one, neither one of the input `folders` nor inside or around one, writable,
    and empty but for an interrupted run's partial predictions (unless `overwrite`)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder; --out is the results folder eval writes "
                        f"({PREDICTIONS}, {RESULTS}, {REPORT}, plots)")
    o = path.resolve()
    for name, given in files.items():
        if given is not None and (o == Path(given).resolve() or o in Path(given).resolve().parents):
            raise DataError(f"--out {out}: is (or contains) the {name} {given}; --out is never an input: choose "
                            "another folder")
    for name, given in folders.items():
        p = Path(given).resolve() if given is not None else None
        if p is not None and (o == p or o in p.parents or p in o.parents):
            raise DataError(f"--out {out}: is (or contains, or lies inside) the {name} {given}; --out is never an "
                            "input: choose another folder")
    if path.is_dir():
        held = sorted(c.name for c in path.iterdir() if c.name not in RESUMABLE)
        if held and not overwrite:
            shown = ", ".join(held[:4]) + (f", ... ({len(held) - 4} more)" if len(held) > 4 else "")
            raise DataError(f"--out {out}: exists and is not empty (it holds {shown}); pass --overwrite to replace "
                            "its results, or choose another folder")
    check_creatable(o / "x", f"--out {out}")
    return path


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: a bench (by name) or questions + answers files; a model or predictions."""

    task: str | None = None  # None: the bench's, else "vqa"
    bench: str | None = None
    max_questions: int | None = None  # the bench's first N questions
    questions: str | None = None
    answers: str | None = None
    image_root: str | None = None
    model: str | None = None
    predictions: str | None = None
    captions: str | None = None  # retrieval, caption: a captions file ({"image", "caption"} rows) instead of a bench
    out: str | None = None  # the results folder (needed with a model)
    batch_size: int = 32
    precision: str = "fp32"
    on_bad_record: str = "error"
    overwrite: bool = False
    gen: GenerationConfig = VQA_GENERATION
    caption_prompt: str | None = None  # caption: the instruction asked per image (None: the bench's, else the default)
    caption_gen: GenerationConfig = CAPTION_GENERATION
    quantize: int | None = None  # 8 / 4: the LM's weights quantised on load (weight-only)
    command: tuple[str, ...] = ()
    progress: bool = True


@dataclass
class EvalOutcome:
    results: dict[str, Any]
    table: str  # what `vitune eval` prints
    result: VQAResult | RetrievalEvaluation
    out: Path | None = None
    files: list[Path] = field(default_factory=list)


def _accuracy(correct: float, n: int) -> dict[str, Any]:
    a = Accuracy(correct, n)
    return {"accuracy": a.value, "n": n, "correct": correct, "ci95": list(a.interval)}


def _pope(p: PopeResult) -> dict[str, Any]:
    return {"precision": p.precision, "recall": p.recall, "f1": p.f1, "yes_ratio": p.yes_ratio, "tp": p.tp,
            "fp": p.fp, "tn": p.tn, "fn": p.fn, "n_unparseable": len(p.unparseable),
            "unparseable_ratio": len(p.unparseable) / p.n if p.n else 0.0}


def _metrics(evaluation: Evaluation) -> tuple[dict, dict]:
    """(overall metrics, per-category metrics), each with n, correct and the 95 % interval (POPE's
    metrics added; multiple choice: the unparseable answers, counted and overall listed)."""
    result = vqa_result(evaluation)
    overall = _accuracy(result.correct, result.n)
    per_category = {c: _accuracy(s.correct, s.n) for c, s in result.per_category.items()}
    if isinstance(evaluation, PopeEvaluation):
        overall.update(_pope(evaluation.overall))
        for c, p in evaluation.per_category.items():
            per_category.setdefault(c, _accuracy(p.tp + p.tn, p.n)).update(_pope(p))
    if isinstance(evaluation, ChoiceEvaluation):
        overall.update(n_unparseable=len(evaluation.unparseable), unparseable=list(evaluation.unparseable),
                       letters=evaluation.letters)
        for c, m in per_category.items():
            m["n_unparseable"] = evaluation.unparseable_per_category.get(c, 0)
    return overall, per_category


def _coverage(result: VQAResult, skipped: int, skipped_file: str | None) -> dict[str, Any]:
    return {"n_scored": result.n, "n_answered": result.n_answered, "n_missing": result.n_missing,
            "missing": list(result.missing), "n_extra": result.n_extra, "extra": list(result.extra),
            "n_empty": result.n_empty, "n_no_reference": result.n_no_reference,
            "n_unused_answers": result.n_unused_answers, "n_skipped": skipped, "skipped_file": skipped_file,
            "lines": coverage_lines(result)}


def _model_folder(model: str | None) -> Path | None:
    """The folder the model's files are in (a training run's model/, where given the run)."""
    from vitune.checkpoints.model_folder import resolve_model_dir
    if model is None:
        return None
    try:
        return resolve_model_dir(model)
    except (OSError, DataError):  # not a model folder: said when it is loaded
        return Path(model)


def _model_record(model: str) -> dict[str, Any]:
    from vitune.checkpoints.model_folder import resolve_model_dir
    folder = resolve_model_dir(model)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {"path": str(Path(model).resolve()), "folder": str(folder.resolve()),
            "weights_sha256": sha256(folder / "model.safetensors"), "config": config}


def quant_config(spec: EvalSpec) -> QuantConfig | None:
    return QuantConfig(bits=spec.quantize) if spec.quantize else None


def predict_into(spec: EvalSpec, questions: str, out: Path, image_root: str | None, gen: GenerationConfig,
                 prompt: str, log: Callable[[str], None]) -> tuple[PredictReport, float]:
    """The model's answers to `questions` into out/predictions.jsonl (resuming a partial one), and
    the seconds it took."""
    t = time.perf_counter()
    report = run_predict(spec.model, questions, str(out / PREDICTIONS), image_root, spec.batch_size, spec.progress,
                         spec.precision, spec.on_bad_record, overwrite=True, gen=gen, log=log, prompt=prompt,
                         quantize=quant_config(spec))
    log(report.summary())
    return report, time.perf_counter() - t


def _decoding(spec: EvalSpec, gen: GenerationConfig | None = None) -> dict[str, Any]:
    g = gen or spec.gen
    return {"strategy": "greedy" if g.temperature == 0 else "sampling", "max_new_tokens": g.max_new_tokens,
            "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed, "stop_strings": list(g.stop_strings),
            "batch_size": spec.batch_size, "precision": spec.precision,
            "quantize": f"int{spec.quantize}" if spec.quantize else None}

"""A captioning evaluation into its results folder (`_run_caption`; `_check_caption` first).

Captioning (`task="caption"`: the bench shapes-captions, or a `captions` file of
{"image", "caption"} rows, several rows per image being its references) asks the model for one
caption per distinct image, in first-appearance order, with a fixed, recorded prompt
(`DEFAULT_CAPTION_PROMPT` unless given) and `CAPTION_GENERATION` (greedy, up to 96 new tokens),
and scores them with `captions.CaptionScorer` (BLEU-1..4, METEOR, ROUGE-L, CIDEr through
pycocoevalcap: corpus-level numbers, as papers report them). A prediction's id is its image path
as the captions file writes it, so `--predictions` files are {"question_id": IMAGE, "text": CAPTION}.

The folder gets `caption_questions.jsonl` (the questions asked: one per image, the prompt as its
text), `predictions.jsonl` (resumable, as for VQA), `results.json` ("metrics": each metric as a
fraction (CIDEr: 0..10) and "n", the images scored; "coverage"; the model, data, prompt and
decoding records) and `report.md`. The metrics are corpus-level, so there are no per-question
scores and `--compare` refuses caption runs. Java and pycocoevalcap are checked before any
caption is generated.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vitune
from vitune.data.vqa_format import read_predictions, write_predictions
from vitune.evaluation.answering import QUESTION
from vitune.evaluation.captions import CaptionMetricsUnavailable, CaptionResult, CaptionScorer
from vitune.evaluation.partial import partial_path
from vitune.evaluation.predict import errors_path
from vitune.evaluation.report import render_report
from vitune.evaluation.results import (
    CAPTION_QUESTIONS,
    PREDICTIONS,
    REPORT,
    RESULTS,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    WRITTEN,
    EvalOutcome,
    EvalSpec,
    _decoding,
    _model_record,
    predict_into,
    sha256,
)
from vitune.evaluation.runner import CAPTION, read_captions
from vitune.evaluation.tables import _caption_table
from vitune.files import DataError, atomic_write_json, atomic_write_jsonl, atomic_write_text

DEFAULT_CAPTION_PROMPT = "Describe the image."


def _check_caption(spec: EvalSpec) -> None:
    """What a caption evaluation takes, and that its metrics can be computed, before any work."""
    if spec.questions or spec.answers:
        raise DataError(f"--task {CAPTION} reads a captions file, not questions and answers: give --captions FILE "
                        '(JSONL rows {"image": PATH, "caption": TEXT}) instead of --questions / --answers')
    if spec.bench and (spec.captions or spec.image_root):
        raise DataError(f"--bench {spec.bench} brings its own captions and images: drop --captions and --image-root")
    if not (spec.bench or spec.captions):
        raise DataError(f"--task {CAPTION} needs --bench shapes-captions or --captions FILE")
    if spec.caption_prompt is not None and not spec.caption_prompt.strip():
        raise DataError("--caption-prompt is empty: give the instruction the model is asked for each caption")
    try:
        from vitune.evaluation.captions import _require
        _require()
    except CaptionMetricsUnavailable as e:
        raise DataError(str(e)) from None


def _references(captions: str, max_images: int | None) -> dict[str, list[str]]:
    """image → its reference captions, images in first-appearance order (the first `max_images`)."""
    refs: dict[str, list[str]] = {}
    for image, text, _ in read_captions(captions):
        if image in refs or max_images is None or len(refs) < max_images:
            refs.setdefault(image, []).append(text)
    return refs


def _questions_file(out: Path, refs: dict[str, list[str]], prompt: str) -> Path:
    """The questions asked (one per image, `prompt` as its text) in `out`; a partial answers file
    left by a run that asked other questions is removed (its answers are not these questions')."""
    path = out / CAPTION_QUESTIONS
    rows = [{"question_id": image, "image": image, "text": prompt} for image in refs]
    if path.exists():
        old = path.read_text(encoding="utf-8")
        atomic_write_jsonl(path, rows)
        if path.read_text(encoding="utf-8") != old:
            partial_path(out / PREDICTIONS).unlink(missing_ok=True)
    else:
        atomic_write_jsonl(path, rows)
    return path


def _score(predictions: dict, refs: dict[str, list[str]]) -> CaptionResult:
    try:
        with CaptionScorer() as scorer:
            return scorer.score(predictions, refs)
    except CaptionMetricsUnavailable as e:
        raise DataError(str(e)) from None


def _metrics(r: CaptionResult) -> dict[str, Any]:
    return {**r.scores(), "n": r.n}


def _coverage(r: CaptionResult, skipped: int, skipped_file: str | None) -> dict[str, Any]:
    return {"n_scored": r.n, "n_answered": r.n_answered, "n_missing": r.n_missing, "missing": list(r.missing),
            "n_extra": r.n_extra, "extra": list(r.extra), "n_empty": r.n_empty, "n_skipped": skipped,
            "skipped_file": skipped_file}


def _run_caption(spec: EvalSpec, bench, captions: str, image_root: str | None, t0: float, created: str,
                 log: Callable[[str], None]) -> EvalOutcome:
    """A caption evaluation into its results folder (module docstring)."""
    prompt = spec.caption_prompt or (bench.prompt if bench else DEFAULT_CAPTION_PROMPT)
    refs = _references(captions, spec.max_questions)
    out = Path(spec.out) if spec.out else None
    predicted, predict_s = None, 0.0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in WRITTEN:  # an earlier run's (--overwrite), except what a resumed run keeps
            if not (spec.model and name in (PREDICTIONS, errors_path(PREDICTIONS).name, CAPTION_QUESTIONS)):
                (out / name).unlink(missing_ok=True)
    if spec.model:
        assert out is not None
        questions = _questions_file(out, refs, prompt)
        root = image_root or str(Path(captions).parent)
        predicted, predict_s = predict_into(spec, str(questions), out, root, spec.caption_gen, QUESTION, log)
        preds_path = out / PREDICTIONS
    else:
        preds_path = Path(spec.predictions)
    predictions = read_predictions(preds_path)
    if not any(image in predictions for image in refs):
        raise DataError(f"none of the {len(predictions)} predictions in {preds_path} is for an image of {captions}: "
                        'nothing matches (a caption prediction\'s question_id is its image path as the captions '
                        'file writes it)')
    result = _score(predictions, refs)
    answered_now = (predicted.n - predicted.resumed) if predicted else 0
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "format_version": RESULTS_VERSION, "vitune_version": vitune.__version__,
        "created": created, "command": shlex.join(spec.command) if spec.command else None, "task": CAPTION,
        "bench": bench.record() if bench else None,
        "data": {"captions": {"path": str(Path(captions).resolve()), "sha256": sha256(captions),
                              "n": sum(len(r) for r in refs.values())},
                 "image_root": str(Path(image_root or Path(captions).parent).resolve()), "n_images": len(refs)},
        "model": _model_record(spec.model) if spec.model else None,
        "predictions": {"source": str(preds_path.resolve()), "sha256": sha256(preds_path)},
        "prompt": prompt,
        "decoding": _decoding(spec, spec.caption_gen) if spec.model else None,
        "seed": spec.caption_gen.seed if spec.model else None,
        "scorer": "pycocoevalcap (PTB tokenizer; BLEU and METEOR corpus-level; ROUGE-L and CIDEr mean over images)",
        "metrics": _metrics(result),
        "coverage": _coverage(result, predicted.skipped if predicted else 0,
                              str(predicted.errors_file) if predicted and predicted.errors_file else None),
        "resumed": predicted.resumed if predicted else 0, "answered_this_run": answered_now,
        "predict_time_s": round(predict_s, 3),
        "questions_per_s": round(answered_now / predict_s, 3) if answered_now and predict_s > 0 else None,
    }
    table = _caption_table(results)
    written: list[Path] = []
    if out is not None:
        if not spec.model:
            write_predictions(out / PREDICTIONS, [{"question_id": q, "text": t} for q, t in predictions.items()])
        results["files"] = {"predictions": PREDICTIONS, "questions": CAPTION_QUESTIONS if spec.model else None,
                            "report": REPORT, "plots": []}
        results["wall_time_s"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(out / RESULTS, results)
        atomic_write_text(out / REPORT, render_report(results))
        written = [out / n for n in (PREDICTIONS, RESULTS, REPORT)]
        table += f"\nresults in {out}: {RESULTS}, {REPORT}, {PREDICTIONS}"
    else:
        results["wall_time_s"] = round(time.perf_counter() - t0, 3)
    return EvalOutcome(results, table, result, out, written)

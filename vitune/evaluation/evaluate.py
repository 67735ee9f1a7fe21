"""`vitune eval` end to end: one evaluation into a results folder (`run_eval`).

`run_eval` answers a question set with a model (`predict.run_predict`, or takes a predictions
file), scores it (`runner.TASKS`) and, given a results folder, writes there:
    predictions.jsonl   the answers ({"question_id", "text"}); `run_predict` streams them to
                        predictions.jsonl.partial first, so rerunning an interrupted command resumes
    scores.jsonl        each scored question's score ({"question_id", "category", "score", "answered"})
    results.json        metrics with n and 95 % Wilson intervals, overall and per category; coverage;
                        what was evaluated (model path, SHA-256 of model.safetensors, its config; data
                        paths and SHA-256; prompt; decoding; seed) and how (vitune version, date, wall
                        time, questions/s, the command)
    report.md           the same, short, for people (rendered from results.json), linking the plots
    per_category.png    accuracy per category with its interval
    confusion.png       reference vs predicted answer counts, for closed-vocabulary sets (2 to
                        CLOSED_VOCABULARY distinct normalised reference answers)
The folder is never an input, and one that holds anything but an interrupted run's partial
predictions is refused unless `overwrite` (`results.check_results_folder`). A retrieval task has no
predictions: it goes to `retrieval_results`; captioning (corpus-level metrics) to `caption_results`.
"""

from __future__ import annotations

import datetime
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import vitune
from vitune.data.vqa_format import read_answers, read_predictions, read_questions, write_predictions
from vitune.evaluation.answering import QUESTION
from vitune.evaluation.answers import vqa_normalize
from vitune.evaluation.caption_results import _check_caption, _run_caption
from vitune.evaluation.choice import extract_letter
from vitune.evaluation.intervals import Accuracy
from vitune.evaluation.metrics import UNCATEGORISED, VQAResult
from vitune.evaluation.predict import errors_path
from vitune.evaluation.report import render_report
from vitune.evaluation.results import (
    CONFUSION_PNG,
    PER_CATEGORY_PNG,
    PREDICTIONS,
    REPORT,
    RESULTS,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    SCORES,
    WRITTEN,
    EvalOutcome,
    EvalSpec,
    _coverage,
    _decoding,
    _metrics,
    _model_folder,
    _model_record,
    check_results_folder,
    predict_into,
    sha256,
)
from vitune.evaluation.retrieval_results import _check_retrieval, _run_retrieval
from vitune.evaluation.runner import CAPTION, RETRIEVAL, TASKS, ChoiceEvaluation, Evaluation, vqa_result
from vitune.evaluation.tables import _table
from vitune.files import DataError, atomic_write_json, atomic_write_jsonl, atomic_write_text

CLOSED_VOCABULARY = 30  # at most this many distinct reference answers: a confusion plot
OTHER, MISSING, UNPARSEABLE = "(other)", "(missing)", "(unparseable)"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_eval(spec: EvalSpec, log: Callable[[str], None] = _log) -> EvalOutcome:
    """The evaluation `spec` describes (module docstring); checks the results folder before any work."""
    from vitune.evaluation.benches import BENCHES, prepare_bench
    t0 = time.perf_counter()
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    if spec.model and not spec.out:
        raise DataError("eval --model writes the model's predictions and results into a folder, never into the "
                        "model folder: give --out RUN_DIR")
    files = {"questions file": spec.questions, "answers file": spec.answers, "predictions file": spec.predictions,
             "captions file": spec.captions}
    folders = {"model folder": _model_folder(spec.model)}
    if spec.captions and spec.task not in (None, RETRIEVAL, CAPTION):
        raise DataError(f"--captions is the input of --task {RETRIEVAL} or {CAPTION}, not of --task {spec.task}")
    if spec.out:
        check_results_folder(spec.out, spec.overwrite, files, folders)
    bench = None
    questions, answers, image_root, prompt, task = spec.questions, spec.answers, spec.image_root, QUESTION, spec.task
    if spec.captions:
        task = task or RETRIEVAL
    bench_task = BENCHES[spec.bench].task if spec.bench in BENCHES else None
    if task == RETRIEVAL or bench_task == RETRIEVAL:
        _check_retrieval(spec)  # before the bench is generated
    if spec.caption_prompt is not None and (task or bench_task) != CAPTION:
        raise DataError(f"--caption-prompt is the instruction of --task {CAPTION}, not of --task {task or bench_task or 'vqa'}")
    if task == CAPTION or bench_task == CAPTION:
        _check_caption(spec)
    if spec.bench:
        bench = prepare_bench(spec.bench, spec.max_questions, log)
        if task is not None and task != bench.task:
            raise DataError(f"bench {bench.name} is a {bench.task} task; --task {task} does not apply to it")
        questions, answers, image_root, prompt, task = (str(bench.questions), str(bench.answers),
                                                        str(bench.image_root), bench.prompt, bench.task)
        if spec.out:
            check_results_folder(spec.out, True, {}, {"bench folder": bench.folder})
    task = task or "vqa"
    if task == RETRIEVAL:
        return _run_retrieval(spec, bench, questions if bench else spec.captions, image_root, t0, created, log)
    if task == CAPTION:
        return _run_caption(spec, bench, questions if bench else spec.captions, image_root, t0, created, log)
    if task not in TASKS:
        raise DataError(f"no task named {task!r}; the tasks are {sorted([*TASKS, RETRIEVAL, CAPTION])}")
    return _run_scored(spec, bench, task, questions, answers, image_root, prompt, t0, created, log)


def _run_scored(spec: EvalSpec, bench, task: str, questions: str, answers: str, image_root: str | None, prompt: str,
                t0: float, created: str, log: Callable[[str], None]) -> EvalOutcome:
    """A task of `TASKS`: the model's answers (or the predictions file) scored into results.json,
    and given a folder, its files (module docstring)."""
    out = Path(spec.out) if spec.out else None
    predicted = None
    predict_s = 0.0
    if spec.model:
        predicted, predict_s = predict_into(spec, questions, out, image_root, spec.gen, prompt, log)
        preds_path = out / PREDICTIONS
    else:
        preds_path = Path(spec.predictions)
    predictions = read_predictions(preds_path)
    evaluation = TASKS[task](questions, answers, predictions, predictions_name=str(preds_path))
    result = vqa_result(evaluation)
    overall, per_category = _metrics(evaluation)
    skipped = predicted.skipped if predicted else 0
    skipped_file = str(predicted.errors_file) if predicted and predicted.errors_file else None
    answered_now = (predicted.n - predicted.resumed) if predicted else 0
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "format_version": RESULTS_VERSION, "vitune_version": vitune.__version__,
        "created": created, "command": shlex.join(spec.command) if spec.command else None, "task": task,
        "bench": bench.record() if bench else None,
        "data": {"questions": {"path": str(Path(questions).resolve()), "sha256": sha256(questions),
                               "n": len(read_questions(questions))},
                 "answers": {"path": str(Path(answers).resolve()), "sha256": sha256(answers)},
                 "image_root": str(Path(image_root or Path(questions).parent).resolve())},
        "model": _model_record(spec.model) if spec.model else None,
        "predictions": {"source": str(preds_path.resolve()), "sha256": sha256(preds_path)},
        "prompt": prompt,
        "decoding": _decoding(spec) if spec.model else None,
        "seed": spec.gen.seed if spec.model else None,
        "metrics": overall, "per_category": per_category,
        "coverage": _coverage(result, skipped, skipped_file),
        "resumed": predicted.resumed if predicted else 0, "answered_this_run": answered_now,
        "predict_time_s": round(predict_s, 3),
        "questions_per_s": round(answered_now / predict_s, 3) if answered_now and predict_s > 0 else None,
    }
    table = _table(evaluation, results)
    written: list[Path] = []
    if out is not None:
        written = _write_scored(out, spec, results, evaluation, predictions, questions, answers, t0, log)
        plots = results["files"]["plots"]
        table += f"\nresults in {out}: {RESULTS}, {REPORT}, {', '.join(plots) or 'no plots'}"
    else:
        results["wall_time_s"] = round(time.perf_counter() - t0, 3)
    return EvalOutcome(results, table, result, out, written)


def _write_scored(out: Path, spec: EvalSpec, results: dict[str, Any], evaluation: Evaluation, predictions: Mapping,
                  questions: str, answers: str, t0: float, log: Callable[[str], None]) -> list[Path]:
    """The results folder's files (an earlier run's removed first, except the answers just
    written); `results` gets its "files" and "wall_time_s". The files written."""
    result = vqa_result(evaluation)
    skipped = results["coverage"]["n_skipped"]
    out.mkdir(parents=True, exist_ok=True)
    for name in WRITTEN:  # an earlier run's (--overwrite), except the answers just written
        if not (spec.model and name in (PREDICTIONS, errors_path(PREDICTIONS).name)):
            (out / name).unlink(missing_ok=True)
    if not spec.model:
        write_predictions(out / PREDICTIONS, [{"question_id": q, "text": t} for q, t in predictions.items()])
    categories = {q.question_id: q.category for q in read_questions(questions)}
    atomic_write_jsonl(out / SCORES, [{"question_id": q, "category": categories.get(q) or UNCATEGORISED,
                                       "score": s, "answered": q in predictions} for q, s in result.scores.items()])
    confusion = _confusion(result, read_answers(answers), predictions, _labeller(evaluation))
    plots = _plots(out, results, confusion, log)
    results["files"] = {"predictions": PREDICTIONS, "scores": SCORES, "report": REPORT, "plots": plots,
                        "skipped": errors_path(PREDICTIONS).name if skipped else None}
    results["wall_time_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(out / RESULTS, results)
    atomic_write_text(out / REPORT, render_report(results))
    return [out / n for n in (PREDICTIONS, SCORES, RESULTS, REPORT, *plots)]


def _labeller(evaluation: Evaluation) -> Callable[[str], str]:
    """How an answer is labelled in the confusion plot: normalised (VQA), or the letter it names
    (multiple choice: `choice.extract_letter`, which normalisation would garble: "A" is an article)."""
    if isinstance(evaluation, ChoiceEvaluation):
        letters = evaluation.letters
        return lambda text: extract_letter(text, letters) or UNPARSEABLE
    return vqa_normalize


def _confusion(result: VQAResult, answers: Mapping, predictions: Mapping,
               label: Callable[[str], str] = vqa_normalize) -> tuple[list[str], list[str], list[str]]:
    """(labels, reference per question, predicted per question) when the reference answers (the
    first of each, labelled by `label`) are a closed vocabulary; else empty lists."""
    refs = [label(answers[q][0]) for q in result.scores]
    labels = sorted(set(refs))
    if not 2 <= len(labels) <= CLOSED_VOCABULARY:
        return [], [], []
    vocabulary = set(labels)
    predicted = []
    for q in result.scores:
        p = label(predictions[q]) if q in predictions else MISSING
        predicted.append(p if p in vocabulary or p in (MISSING, UNPARSEABLE) else OTHER)
    return labels, refs, predicted


def _plots(out: Path, results: dict, confusion: tuple[list[str], list[str], list[str]], log) -> list[str]:
    """Draw what applies; without matplotlib: none, said so (the `eval` extra installs it)."""
    from vitune.evaluation import plots
    title = results["bench"]["name"] if results["bench"] else Path(results["data"]["questions"]["path"]).name
    rows = [(c, Accuracy(m["correct"], m["n"])) for c, m in results["per_category"].items()]
    rows.append(("overall", Accuracy(results["metrics"]["correct"], results["metrics"]["n"])))
    made = []
    try:
        plots.per_category_plot(out / PER_CATEGORY_PNG, rows, f"{title}: accuracy per category (95 % Wilson CI)")
        made.append(PER_CATEGORY_PNG)
        labels, refs, predicted = confusion
        if labels:
            plots.confusion_plot(out / CONFUSION_PNG, refs, predicted, labels, f"{title}: reference vs predicted")
            made.append(CONFUSION_PNG)
    except ImportError as e:
        log(f"note: no plots ({e}); install vitune's eval extra (matplotlib) for them")
    return made

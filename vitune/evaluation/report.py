"""`vitune eval` end to end: one evaluation into a results folder, and the comparison of two.

`run_eval` answers a question set with a model (or takes a predictions file), scores it
(`runner.TASKS`) and, given a results folder, writes there:
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
predictions is refused unless `overwrite`. `compare_runs` pairs two folders' per-question scores.

Retrieval (`task="retrieval"`: the bench shapes-retrieval, or a `captions` file of
{"image", "caption"} rows) has no predictions: `runner.eval_retrieval` embeds the images and
captions with the model's alignment head, and the folder gets only results.json (its "metrics":
"i2t" and "t2i", each {"R@1", "R@5", "R@10"} as fractions, with "n_images", "n_captions", "n_i2t",
"n_t2i"; the "protocol"; the model and captions SHA-256) and report.md. Per-query ranks are not
stored, so `compare_runs` refuses retrieval runs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vitune
from vitune.data.vqa_format import (
    read_answers,
    read_predictions,
    read_questions,
    write_predictions,
)
from vitune.evaluation.answers import vqa_normalize
from vitune.evaluation.intervals import Accuracy, compare
from vitune.evaluation.metrics import (
    UNCATEGORISED,
    VQAResult,
    coverage_lines,
    format_table,
)
from vitune.evaluation.pope import PopeResult
from vitune.evaluation.runner import (
    QUESTION,
    RETRIEVAL,
    TASKS,
    VQA_GENERATION,
    PopeEvaluation,
    RetrievalEvaluation,
    errors_path,
    eval_retrieval,
    partial_path,
    run_predict,
)
from vitune.files import (
    DataError,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_json_records,
)
from vitune.inference.generate import GenerationConfig

RESULTS_FORMAT = "vitune-eval-results"
RESULTS_VERSION = 1
PREDICTIONS, SCORES, RESULTS, REPORT = "predictions.jsonl", "scores.jsonl", "results.json", "report.md"
PER_CATEGORY_PNG, CONFUSION_PNG = "per_category.png", "confusion.png"
CLOSED_VOCABULARY = 30  # at most this many distinct reference answers: a confusion plot
OTHER, MISSING = "(other)", "(missing)"
WRITTEN = (PREDICTIONS, SCORES, RESULTS, REPORT, PER_CATEGORY_PNG, CONFUSION_PNG, errors_path(PREDICTIONS).name)
RESUMABLE = frozenset({partial_path(PREDICTIONS).name})  # what an interrupted run leaves: not "non-empty"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


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
    folder = o
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"--out {out}: cannot create it: {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: cannot write in {folder} (permission denied)")
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
    captions: str | None = None  # retrieval: a captions file ({"image", "caption"} rows) instead of a bench
    out: str | None = None  # the results folder (needed with a model)
    batch_size: int = 32
    precision: str = "fp32"
    on_bad_record: str = "error"
    overwrite: bool = False
    gen: GenerationConfig = VQA_GENERATION
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


def _metrics(evaluation: VQAResult | PopeEvaluation) -> tuple[dict, dict]:
    """(overall metrics, per-category metrics), each with n, correct and the 95 % interval."""
    result = evaluation.result if isinstance(evaluation, PopeEvaluation) else evaluation
    overall = _accuracy(result.correct, result.n)
    per_category = {c: _accuracy(s.correct, s.n) for c, s in result.per_category.items()}
    if isinstance(evaluation, PopeEvaluation):
        overall.update(_pope(evaluation.overall))
        for c, p in evaluation.per_category.items():
            per_category.setdefault(c, _accuracy(p.tp + p.tn, p.n)).update(_pope(p))
    return overall, per_category


def _coverage(result: VQAResult, skipped: int, skipped_file: str | None) -> dict[str, Any]:
    return {"n_scored": result.n, "n_answered": result.n_answered, "n_missing": result.n_missing,
            "missing": list(result.missing), "n_extra": result.n_extra, "extra": list(result.extra),
            "n_empty": result.n_empty, "n_no_reference": result.n_no_reference,
            "n_unused_answers": result.n_unused_answers, "n_skipped": skipped, "skipped_file": skipped_file,
            "lines": coverage_lines(result)}


def _confusion(result: VQAResult, answers: Mapping, predictions: Mapping) -> tuple[list[str], list[str], list[str]]:
    """(labels, reference per question, predicted per question) when the reference answers (the
    first of each, normalised) are a closed vocabulary; else empty lists."""
    refs = [vqa_normalize(answers[q][0]) for q in result.scores]
    labels = sorted(set(refs))
    if not 2 <= len(labels) <= CLOSED_VOCABULARY:
        return [], [], []
    vocabulary = set(labels)
    predicted = []
    for q in result.scores:
        p = vqa_normalize(predictions[q]) if q in predictions else MISSING
        predicted.append(p if p in vocabulary or p == MISSING else OTHER)
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
    if spec.captions and spec.task not in (None, RETRIEVAL):
        raise DataError(f"--captions is the input of --task {RETRIEVAL}, not of --task {spec.task}")
    if spec.out:
        check_results_folder(spec.out, spec.overwrite, files, folders)
    bench = None
    questions, answers, image_root, prompt, task = spec.questions, spec.answers, spec.image_root, QUESTION, spec.task
    if spec.captions:
        task = RETRIEVAL
    if task == RETRIEVAL or (spec.bench in BENCHES and BENCHES[spec.bench].task == RETRIEVAL):
        _check_retrieval(spec)  # before the bench is generated
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
    if task not in TASKS:
        raise DataError(f"no task named {task!r}; the tasks are {sorted([*TASKS, RETRIEVAL])}")
    out = Path(spec.out) if spec.out else None
    predicted = None
    predict_s = 0.0
    if spec.model:
        t = time.perf_counter()
        predicted = run_predict(spec.model, questions, str(out / PREDICTIONS), image_root, spec.batch_size,
                                spec.progress, spec.precision, spec.on_bad_record, overwrite=True, gen=spec.gen,
                                log=log, prompt=prompt)
        predict_s = time.perf_counter() - t
        log(predicted.summary())
        preds_path = out / PREDICTIONS
    else:
        preds_path = Path(spec.predictions)
    predictions = read_predictions(preds_path)
    evaluation = TASKS[task](questions, answers, predictions, predictions_name=str(preds_path))
    result = evaluation.result if isinstance(evaluation, PopeEvaluation) else evaluation
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
        out.mkdir(parents=True, exist_ok=True)
        for name in WRITTEN:  # an earlier run's (--overwrite), except the answers just written
            if not (spec.model and name in (PREDICTIONS, errors_path(PREDICTIONS).name)):
                (out / name).unlink(missing_ok=True)
        if not spec.model:
            write_predictions(out / PREDICTIONS, [{"question_id": q, "text": t} for q, t in predictions.items()])
        categories = {q.question_id: q.category for q in read_questions(questions)}
        atomic_write_jsonl(out / SCORES, [{"question_id": q, "category": categories.get(q) or UNCATEGORISED,
                                           "score": s, "answered": q in predictions} for q, s in result.scores.items()])
        confusion = _confusion(result, read_answers(answers), predictions)
        plots = _plots(out, results, confusion, log)
        results["files"] = {"predictions": PREDICTIONS, "scores": SCORES, "report": REPORT, "plots": plots,
                            "skipped": errors_path(PREDICTIONS).name if skipped else None}
        results["wall_time_s"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(out / RESULTS, results)
        atomic_write_text(out / REPORT, render_report(results))
        written = [out / n for n in (PREDICTIONS, SCORES, RESULTS, REPORT, *plots)]
        table += f"\nresults in {out}: {RESULTS}, {REPORT}, {', '.join(plots) or 'no plots'}"
    else:
        results["wall_time_s"] = round(time.perf_counter() - t0, 3)
    return EvalOutcome(results, table, result, out, written)


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


def _render_retrieval_report(results: Mapping[str, Any]) -> str:
    bench, model, data, m = results["bench"], results["model"], results["data"], results["metrics"]
    title = bench["name"] if bench else Path(data["captions"]["path"]).name
    e, proto = results["embedding"], results["protocol"]
    lines = [f"# Evaluation: {title}", "",
             f"- **model**: `{model['path']}` (model.safetensors SHA-256 `{model['weights_sha256'][:16]}…`)"]
    if bench:
        params = ", ".join(f"{k}={v}" for k, v in bench["params"].items() if v is not None)
        lines.append(f"- **bench**: {bench['name']} ({bench['description']}; {params})")
    lines += [(f"- **captions**: `{data['captions']['path']}` ({data['captions']['n']} captions of "
               f"{data['n_images']} images, SHA-256 `{data['captions']['sha256'][:16]}…`)"),
              (f"- **task**: retrieval; {proto['similarity']} similarity; image → text: a hit when "
               f"{proto['i2t_hit']}; text → image: when {proto['t2i_hit']}; ties {proto['ties']}"),
              (f"- **embedding**: batch size {e['batch_size']}, {e['precision']}, captions cut to "
               f"{e['text_max_len']} tokens ({e['n_captions_cut']} were)"),
              (f"- **date**: {results['created']}; vitune {results['vitune_version']}; wall time "
               f"{results['wall_time_s']} s"), "", "## Results", ""]
    ks = list(m["i2t"])
    lines += ["| direction | n | " + " | ".join(ks) + " |", "|---|---:|" + "---:|" * len(ks)]
    for label, n, recall in _retrieval_rows(results):
        lines.append(f"| {label.replace('->', '→')} | {n} | " + " | ".join(f"{_pct(v)} %" for v in recall.values()) + " |")
    if results["command"]:
        lines += ["", "## Command", "", f"    {results['command']}"]
    return "\n".join(lines) + "\n"


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


def _decoding(spec: EvalSpec) -> dict[str, Any]:
    g = spec.gen
    return {"strategy": "greedy" if g.temperature == 0 else "sampling", "max_new_tokens": g.max_new_tokens,
            "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed, "stop_strings": list(g.stop_strings),
            "batch_size": spec.batch_size, "precision": spec.precision}


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


def _table(evaluation: VQAResult | PopeEvaluation, results: dict) -> str:
    name = results["bench"]["name"] if results["bench"] else results["data"]["questions"]["path"]
    head = f"{results['task']} on {name}: {Accuracy(results['metrics']['correct'], results['metrics']['n'])}"
    if isinstance(evaluation, PopeEvaluation):
        body = _pope_table(results) + "".join(f"\n{line}" for line in coverage_lines(evaluation.result))
    else:
        body = format_table(evaluation, intervals=True)
    skipped = results["coverage"]["n_skipped"]
    if skipped:
        body += f"\n{skipped} question(s) skipped as bad records (see {results['coverage']['skipped_file']}): no " \
                "prediction, counted as wrong"
    return f"{head}\n{body}"


# -- report.md --------------------------------------------------------------------------------------

def render_report(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results.json."""
    if results["task"] == RETRIEVAL:
        return _render_retrieval_report(results)
    bench, model, data = results["bench"], results["model"], results["data"]
    title = bench["name"] if bench else Path(data["questions"]["path"]).name
    lines = [f"# Evaluation: {title}", ""]
    if model:
        lines.append(f"- **model**: `{model['path']}` (model.safetensors SHA-256 `{model['weights_sha256'][:16]}…`)")
    else:
        lines.append(f"- **predictions**: `{results['predictions']['source']}` (SHA-256 "
                     f"`{results['predictions']['sha256'][:16]}…`)")
    if bench:
        params = ", ".join(f"{k}={v}" for k, v in bench["params"].items() if v is not None)
        lines.append(f"- **bench**: {bench['name']} ({bench['description']}; {params})")
    lines.append(f"- **questions**: `{data['questions']['path']}` ({data['questions']['n']} questions, SHA-256 "
                 f"`{data['questions']['sha256'][:16]}…`)")
    lines.append(f"- **answers**: `{data['answers']['path']}` (SHA-256 `{data['answers']['sha256'][:16]}…`)")
    lines.append(f"- **task**: {results['task']}; **prompt**: `{results['prompt']}`")
    if results["decoding"]:
        d = results["decoding"]
        lines.append(f"- **decoding**: {d['strategy']}, max_new_tokens {d['max_new_tokens']}, temperature "
                     f"{d['temperature']}, top_p {d['top_p']}, seed {d['seed']}; batch size {d['batch_size']}, "
                     f"{d['precision']}")
    speed = f", {results['questions_per_s']:.1f} questions/s" if results.get("questions_per_s") else ""
    lines.append(f"- **date**: {results['created']}; vitune {results['vitune_version']}; wall time "
                 f"{results['wall_time_s']} s{speed}")
    lines += ["", "## Results", ""]
    pope = results["task"] == "pope"
    head = "| category | n | accuracy | 95 % CI |" + (" precision | recall | F1 | yes-ratio | unparseable |" if pope else "")
    lines += [head, "|---|---:|---:|---|" + ("---:|---:|---:|---:|---:|" if pope else "")]
    for c, m in [*results["per_category"].items(), ("**overall**", results["metrics"])]:
        row = f"| {c} | {m['n']} | {_pct(m['accuracy'])} % | {_ci(m)} % |"
        if pope:
            row += (f" {_pct(m['precision'])} % | {_pct(m['recall'])} % | {_pct(m['f1'])} % | "
                    f"{_pct(m['yes_ratio'])} % | {m['n_unparseable']} |")
        lines.append(row)
    cov = results["coverage"]
    lines += ["", "## Coverage", ""]
    every = f"- every one of the {cov['n_scored']} scored questions has a prediction"
    lines += [f"- {line}" for line in cov["lines"]] or [every]
    if cov["n_skipped"]:
        lines.append(f"- {cov['n_skipped']} question(s) skipped as bad records (`{cov['skipped_file']}`), counted "
                     "as wrong")
    plots = results.get("files", {}).get("plots", [])
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.removesuffix('.png')}]({p})" for p in plots]
    if results["command"]:
        lines += ["", "## Command", "", f"    {results['command']}"]
    return "\n".join(lines) + "\n"


# -- comparing two runs -----------------------------------------------------------------------------

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


"""`run_predict`: a questions file answered by a model into a predictions file.

`run_predict` asks each question as `prompt` says: "{question}" (the default) is the text as given;
the answering itself is `answering.predict_batches`, the partial file `partial`. It never loses
work and never writes where it must not:
- the output is checked before the model loads: not a folder, its folder writable or creatable,
  not one of the inputs, and not an existing file unless `overwrite` (`check_output`);
- answers are appended batch by batch to `OUT.partial` (flushed and fsynced), whose first line
  names the questions file and the model; at the end they are written to OUT in question order
  (atomically) and the partial file is removed. Rerunning the same command after an interruption
  keeps the answers there (a half-written last line is dropped) and answers only the rest; a
  partial file of other questions or another model is an error asking to delete it;
- `on_bad_record="error"` (default) stops at the first question whose image is missing or corrupt,
  whose `<image>` tags do not match its image, or whose prompt is too long, naming the question
  (the answers so far stay in OUT.partial); `"skip"` writes such questions to `OUT.errors.jsonl`
  ({"question_id", "error"}) and answers the rest.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from vitune.checkpoints.model_folder import resolve_model_dir
from vitune.data.vqa_format import Question, QuestionId, read_questions, write_predictions
from vitune.evaluation.answering import (
    QUESTION,
    VQA_GENERATION,
    _batches,
    _check_policy,
    predict_batches,
    render_prompt,
)
from vitune.evaluation.partial import append_answers, open_partial, partial_header, partial_path, resume_partial
from vitune.files import DataError, atomic_write_jsonl, check_creatable
from vitune.inference.assistant import Assistant
from vitune.inference.generate import GenerationConfig
from vitune.model.quant import QuantConfig


def errors_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.errors.jsonl")


def check_output(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], overwrite: bool = False,
                 flag: str = "--out", sidecars: bool = True) -> Path:
    """Refuse, before any work, an output file path that is a folder, whose folder cannot be
    written or created, that is (or whose `.partial` / `.errors.jsonl` is) one of the `inputs`
    (name → path), or that exists already (unless `overwrite`)."""
    text = os.fspath(out)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise DataError(f"{flag} {text}: is a folder; give a file path, such as {path / 'predictions.jsonl'}")
    targets = [path, *([partial_path(path), errors_path(path)] if sidecars else [])]
    for name, given in inputs.items():
        if given is None:
            continue
        for t in targets:
            if t.resolve() == Path(given).resolve():
                what = text if t == path else f"{text} (its {t.name})"
                raise DataError(f"{flag} {what} would overwrite the {name} {os.fspath(given)}; choose another path")
    check_creatable(path, f"{flag} {text}")
    if path.exists() and not overwrite:
        raise DataError(f"{flag} {text} already exists; pass --overwrite to replace it, or choose another path")
    return path


@dataclass(frozen=True)
class PredictReport:
    out: Path
    n: int  # predictions written to `out`, resumed ones included
    n_questions: int
    resumed: int = 0  # answers kept from an interrupted run's partial file
    skipped: int = 0  # questions written to `errors_file` instead (on_bad_record="skip")
    errors_file: Path | None = None

    def summary(self) -> str:
        text = f"wrote {self.n} predictions to {self.out}"
        if self.skipped:
            text += f"; {self.skipped} questions skipped (see {self.errors_file})"
        return text


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_predict(model_dir: str, questions_path: str, out_path: str, image_root: str | None = None,
                batch_size: int = 32, progress: bool = True, precision: str = "fp32", on_bad_record: str = "error",
                overwrite: bool = False, gen: GenerationConfig = VQA_GENERATION,
                log: Callable[[str], None] = _log, prompt: str = QUESTION,
                quantize: QuantConfig | None = None) -> PredictReport:
    """Answer a questions file into a predictions file; see the module docstring for the checks,
    the partial file (resume) and the bad-question policies. `log` gets the resume notice.
    `prompt` is the template each question's text is asked through (`render_prompt`); `quantize`:
    the model's LM weights quantised on load (weight-only int8 / int4)."""
    _check_policy(on_bad_record)
    render_prompt(prompt, "")  # checks it
    _batches([], batch_size)  # checks it
    root = Path(image_root) if image_root else Path(questions_path).parent
    out = check_output(out_path, {"questions file": questions_path, "model folder": model_dir,
                                  "image root": image_root}, overwrite)
    folder = resolve_model_dir(model_dir)
    questions = _read_questions(questions_path, prompt)
    if on_bad_record == "error":  # a missing image stops the run before the model loads
        _check_images(questions, root)
    partial = partial_path(out)
    header = partial_header(questions_path, folder, prompt, quantize.name if quantize else None)
    kept = resume_partial(partial, header, questions, questions_path)
    done = kept or {}
    resumed = len(done)
    if resumed:
        log(f"resuming: {resumed} of {len(questions)} answers kept from {partial}")
    todo = [q for q in questions if q.question_id not in done]
    errors: list[dict] = []
    if todo:
        assistant = Assistant.load(folder, precision=precision, quantize=quantize)
        with open_partial(partial, header, fresh=kept is None) as f:
            try:
                for answered, errs in predict_batches(assistant, todo, root, batch_size, gen, on_bad_record, progress):
                    append_answers(f, answered)
                    done.update((q.question_id, t) for q, t in answered)
                    errors += errs
            except DataError as e:
                raise DataError(f"{e}\n{len(done)} answer(s) so far are kept in {partial}: fix this and rerun the same "
                                "command to continue, or pass --on-bad-record skip to skip such questions") from e
            except KeyboardInterrupt:
                log(f"interrupted: {len(done)} answer(s) kept in {partial}; rerun the same command to continue")
                raise
    n = _write_outputs(out, questions, done, errors)
    return PredictReport(out, n, len(questions), resumed, len(errors), errors_path(out) if errors else None)


def _read_questions(questions_path: str, prompt: str) -> list[Question]:
    """The questions, each text asked through `prompt`; none is an error."""
    questions = read_questions(questions_path)
    if not questions:
        raise DataError(f"{questions_path}: holds no questions")
    if prompt != QUESTION:
        questions = [dataclasses.replace(q, text=render_prompt(prompt, q.text)) for q in questions]
    return questions


def _check_images(questions: list[Question], root: Path) -> None:
    """Each image there, checked once, naming the first question that asks about a missing one."""
    first = {}
    for q in questions:
        first.setdefault(q.image, q)
    for image, q in first.items():
        if not (root / image).is_file():
            raise DataError(f"question {q.question_id!r}: image not found: {root / image}")


def _write_outputs(out: Path, questions: list[Question], done: Mapping[QuestionId, str], errors: list[dict]) -> int:
    """OUT in question order and its errors file (or none), then the partial file removed; the
    number of predictions written."""
    rows = [{"question_id": q.question_id, "text": done[q.question_id]} for q in questions if q.question_id in done]
    errs_file = errors_path(out)
    if errors:
        atomic_write_jsonl(errs_file, errors)
    else:
        errs_file.unlink(missing_ok=True)  # an earlier run's, for questions answered now
    n = write_predictions(out, rows)
    partial_path(out).unlink(missing_ok=True)
    return n

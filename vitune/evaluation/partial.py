"""The partial predictions file `OUT.partial` that `predict.run_predict` streams answers to.

Its first line (`partial_header`) names what the answers are answers of: the questions file, the
model folder and its weights (size and modification time: a model saved again since is not the
same one), and the prompt where it is not the default. Answers are appended batch by batch,
flushed and fsynced (`append_answers`), so an interrupted run keeps them: `resume_partial` reads
them back (a half-written last line is dropped, the file cut after its last complete one) and
refuses a partial file of other questions, another model or another prompt, asking to delete it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from vitune.data.vqa_format import Question, QuestionId, prediction_row
from vitune.evaluation.answering import QUESTION, Answered
from vitune.files import DataError

PARTIAL_FORMAT = "vitune-partial-predictions"


def partial_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.partial")


def partial_header(questions_path: str, folder: Path, prompt: str, quantize: str | None = None) -> dict:
    """The partial file's first line: what its answers are answers of."""
    weights = (folder / "model.safetensors").stat()
    header = {"format": PARTIAL_FORMAT, "questions": str(Path(questions_path).resolve()), "model": str(folder.resolve()),
              "weights": f"{weights.st_size}:{weights.st_mtime_ns}"}  # a model saved again since: not the same one
    if prompt != QUESTION:
        header["prompt"] = prompt
    if quantize is not None:  # answers of the model quantised on load: another model's
        header["quantize"] = quantize
    return header


def resume_partial(partial: Path, header: dict, questions: list[Question],
                   questions_path: str) -> dict[QuestionId, str] | None:
    """The answers an interrupted run left in `partial` (None: no usable partial file). The file is
    cut after its last complete line, so a half-written one is dropped and appending goes on."""
    if not partial.exists():
        return None
    data = partial.read_bytes()
    hint = f"delete {partial} to start over"
    lines = data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
    if not lines:  # not even the header got written
        return None
    try:
        got = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        got = None
    if not isinstance(got, dict) or got.get("format") != PARTIAL_FORMAT:
        raise DataError(f"{partial}: not a vitune partial predictions file (line 1); {hint}")
    for key in ("questions", "model"):
        if got.get(key) != header[key]:
            raise DataError(f"{partial} holds answers for {key} {got.get(key)}, not {header[key]}: rerun that "
                            f"command to continue it, or {hint}")
    if got.get("prompt", QUESTION) != header.get("prompt", QUESTION):
        raise DataError(f"{partial} holds answers to the prompt {got.get('prompt', QUESTION)!r}, not "
                        f"{header.get('prompt', QUESTION)!r}; {hint}")
    if got.get("weights") != header["weights"]:
        raise DataError(f"{partial} holds answers of an earlier save of the model in {header['model']} (it was "
                        f"saved again since); {hint}")
    ids = {q.question_id for q in questions}
    seen: set = set()
    done: dict[QuestionId, str] = {}
    keep = len(lines[0]) + 1
    for k, line in enumerate(lines[1:], 2):
        where = f"{partial}: line {k}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if k == len(lines):
                break  # the last line, cut short
            raise DataError(f"{where}: malformed JSON; {hint}") from None
        try:
            qid, text = prediction_row(row, where, seen)
        except DataError as e:
            raise DataError(f"{e}; {hint}") from None
        if qid not in ids:
            raise DataError(f"{where}: question_id {qid!r} is not a question in {questions_path}: the partial file "
                            f"does not match the questions; {hint}")
        done[qid] = text
        keep += len(line) + 1
    if keep < len(data):
        os.truncate(partial, keep)
    return done


def open_partial(partial: Path, header: dict, fresh: bool) -> IO[str]:
    if fresh:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(header, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return open(partial, "a", encoding="utf-8", newline="\n")


def append_answers(f: IO[str], answered: Answered) -> None:
    """One batch's answers, on disk before the next batch starts."""
    if answered:
        f.write("".join(json.dumps({"question_id": q.question_id, "text": t}, ensure_ascii=False) + "\n"
                        for q, t in answered))
        f.flush()
        os.fsync(f.fileno())

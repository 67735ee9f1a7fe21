"""The VQA evaluation file format: questions, reference answers and predictions as JSONL.

    questions    {"question_id": 0, "image": "images/test_00000.png", "text": "...", "category": "color"}
    answers      {"question_id": 0, "answer": "red"}   or   {"question_id": 0, "answers": ["red", {"answer": "red"}]}
    predictions  {"question_id": 0, "text": "red"}

A question_id is an int or a str and is kept exactly as given (1 and "1" are different ids).
Readers accept a JSON list as well as JSONL, and raise `DataError` naming the file and the line
(or item) of any missing field, wrong type or duplicate question_id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from vitune.files import DataError, atomic_write_jsonl, read_json_records

QuestionId = int | str


@dataclass(frozen=True)
class Question:
    question_id: QuestionId
    image: str
    text: str
    category: str | None = None


def _locations(path: Path, n: int) -> list[str]:
    """'file: line N' (JSONL) or 'file: item N' (JSON list) for each of the n records read."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [f"{path}: item {i}" for i in range(n)]
    return [f"{path}: line {k}" for k, line in enumerate(text.split("\n"), 1) if line.strip()][:n]


def _records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    path = Path(path)
    rows = read_json_records(path)
    return list(zip(_locations(path, len(rows)), rows, strict=True))


def _field(row: dict, key: str, types: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    if key not in row or row[key] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _question_id(row: dict, where: str, seen: set) -> QuestionId:
    qid = _field(row, "question_id", (int, str), where)
    if qid in seen:
        raise DataError(f"{where}: duplicate question_id {qid!r}")
    seen.add(qid)
    return qid


def read_questions(path: str | os.PathLike) -> list[Question]:
    seen: set = set()
    out = []
    for where, row in _records(path):
        qid = _question_id(row, where, seen)
        out.append(Question(qid, _field(row, "image", str, where), _field(row, "text", str, where),
                            _field(row, "category", str, where, optional=True)))
    return out


def _answer_list(row: dict, where: str) -> list[str]:
    if "answers" not in row:
        return [_field(row, "answer", str, where)]
    items = _field(row, "answers", list, where)
    if not items:
        raise DataError(f"{where}: 'answers' is empty")
    out = []
    for k, item in enumerate(items):
        if isinstance(item, dict):
            item = item.get("answer")
        if not isinstance(item, str):
            raise DataError(f"{where}: answers[{k}] must be a string or {{'answer': string}}")
        out.append(item)
    return out


def read_answers(path: str | os.PathLike) -> dict[QuestionId, list[str]]:
    """question_id → reference answers (one or more)."""
    seen: set = set()
    return {_question_id(row, where, seen): _answer_list(row, where) for where, row in _records(path)}


def prediction_row(row: Any, where: str, seen: set) -> tuple[QuestionId, str]:
    """One prediction record checked: an object with a question_id not in `seen` (added) and a text."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return _question_id(row, where, seen), _field(row, "text", str, where)


def read_predictions(path: str | os.PathLike) -> dict[QuestionId, str]:
    """question_id → predicted answer text."""
    seen: set = set()
    return dict(prediction_row(row, where, seen) for where, row in _records(path))


def write_predictions(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Atomically write prediction rows ({"question_id", "text", ...extra fields}); return the count."""
    seen: set = set()
    out = []
    for k, row in enumerate(rows):
        where = f"{path}: prediction {k}"
        row = dict(row)
        _question_id(row, where, seen)
        _field(row, "text", str, where)
        out.append(row)
    atomic_write_jsonl(path, out)
    return len(out)

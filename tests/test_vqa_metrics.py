"""VQA file format (reading, validation, writing) and exact-match metrics."""

import json

import pytest

from vitune.data.vqa_format import Question, read_answers, read_predictions, read_questions, write_predictions
from vitune.evaluation.metrics import format_table, normalize_answer, vqa_exact_match
from vitune.files import DataError


def write_lines(path, rows, blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("raw, want", [
    ("Red", "red"), ("  yes.  ", "yes"), ("No!", "no"), ("The Top   Left", "top left"), ("two", "2"),
    ("Ten circles?!", "10 circles"), ("a square", "square"), ("an orange", "orange"), ("zero", "0"),
    ("3", "3"), ("eleven", "eleven"), ("bottom\tright", "bottom right"), ("theory", "theory"),
])
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


def test_exact_match_scores_and_reports_missing():
    answers = {1: ["red"], 2: ["2", "two"], 3: ["yes"], "q4": ["circle"], 5: "top left"}
    predictions = {1: "Red.", 2: "Two", 3: "no", 5: "the top left", 99: "extra"}
    categories = {1: "color", 2: "count", 3: "existence", "q4": "shape", 5: None}
    r = vqa_exact_match(predictions, answers, categories)
    assert (r.n, r.correct, r.accuracy) == (5, 3, 0.6)
    assert r.missing == ("q4",) and r.n_missing == 1 and r.n_extra == 1
    assert {c: (s.n, s.correct) for c, s in r.per_category.items()} == {
        "color": (1, 1), "count": (1, 1), "existence": (1, 0), "shape": (1, 0), "(none)": (1, 1)}
    assert r.per_category["existence"].accuracy == 0.0
    assert vqa_exact_match(predictions, answers).per_category == {}
    with pytest.raises(ValueError):
        vqa_exact_match(predictions, {})


def test_format_table():
    answers = {1: ["red"], 2: ["green"], 3: ["x"]}
    r = vqa_exact_match({1: "red", 2: "blue"}, answers, {1: "color", 2: "color", 3: "size"})
    table = format_table(r)
    lines = table.splitlines()
    assert lines[0].split() == ["category", "n", "accuracy"]
    assert lines[1].split() == ["color", "2", "50.0%"] and lines[2].split() == ["size", "1", "0.0%"]
    assert lines[4].split() == ["overall", "3", "33.3%"]
    assert "1 question(s) had no prediction" in table


def test_read_questions_and_answers(tmp_path):
    q = write_lines(tmp_path / "q.jsonl", [{"question_id": 0, "image": "a.png", "text": "what?", "category": "color"},
                                           {"question_id": "x1", "image": "b.png", "text": "where?"}])
    assert read_questions(q) == [Question(0, "a.png", "what?", "color"), Question("x1", "b.png", "where?", None)]
    a = write_lines(tmp_path / "a.jsonl", [{"question_id": 0, "answer": "red"},
                                           {"question_id": "0", "answers": ["2", {"answer": "two"}]}])
    assert read_answers(a) == {0: ["red"], "0": ["2", "two"]}  # ids kept as given
    (tmp_path / "a.json").write_text(json.dumps([{"question_id": 7, "answer": "yes"}]))
    assert read_answers(tmp_path / "a.json") == {7: ["yes"]}


@pytest.mark.parametrize("rows, reader, message", [
    ([{"question_id": 1, "image": "a.png"}], read_questions, r"line 3: missing field 'text'"),
    ([{"question_id": 1, "image": "a.png", "text": 5}], read_questions, r"line 3: field 'text' must be str"),
    ([{"question_id": 1.5, "image": "a.png", "text": "t"}], read_questions, r"line 3: field 'question_id'"),
    ([{"question_id": True, "text": "t"}], read_predictions, r"line 3: field 'question_id'"),
    ([{"question_id": 0, "text": "t"}], read_predictions, r"line 3: duplicate question_id 0"),
    ([{"question_id": 1, "answers": [3]}], read_answers, r"line 3: answers\[0\]"),
    ([{"question_id": 1, "answers": []}], read_answers, r"line 3: 'answers' is empty"),
    ([{"question_id": 1}], read_answers, r"line 3: missing field 'answer'"),
])
def test_validation_names_file_and_line(tmp_path, rows, reader, message):
    first = {"question_id": 0, "image": "a.png", "text": "ok", "answer": "ok"}
    path = write_lines(tmp_path / "bad.jsonl", [first, *rows], blank_after_first=True)
    with pytest.raises(DataError, match=r"bad\.jsonl: " + message):
        reader(path)


def test_predictions_round_trip(tmp_path):
    rows = [{"question_id": 0, "text": "red"}, {"question_id": "b", "text": "2", "model": "tiny"}]
    assert write_predictions(tmp_path / "p.jsonl", rows) == 2
    assert read_predictions(tmp_path / "p.jsonl") == {0: "red", "b": "2"}
    with pytest.raises(DataError, match="duplicate question_id 0"):
        write_predictions(tmp_path / "dup.jsonl", [rows[0], rows[0]])
    assert not (tmp_path / "dup.jsonl").exists()

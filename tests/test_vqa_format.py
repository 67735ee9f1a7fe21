"""VQA evaluation files (data/vqa_format.py): field validation and locations (JSON list items,
JSONL lines after blank lines), answer lists, and `write_predictions` (validated, atomic, exact),
beyond what tests/test_vqa_metrics.py covers."""

import json

import pytest

from vitune.data.vqa_format import (
    Question,
    read_answers,
    read_predictions,
    read_questions,
    write_predictions,
)
from vitune.files import DataError

Q = {"question_id": 0, "image": "a.png", "text": "what?"}


def jsonl(path, rows, lead="\n  \n"):
    """Rows as JSONL after `lead` (blank and whitespace-only lines, which are not records)."""
    path.write_text(lead + "\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_questions_from_a_json_list_keep_order_and_types(tmp_path):
    rows = [Q, {"question_id": "q-1", "image": "b.png", "text": "where?", "category": "position"},
            {"question_id": 2, "image": "c.png", "text": "how many?", "category": None}]
    (tmp_path / "q.json").write_text(json.dumps(rows, indent=2))
    assert read_questions(tmp_path / "q.json") == [
        Question(0, "a.png", "what?"), Question("q-1", "b.png", "where?", "position"),
        Question(2, "c.png", "how many?")]


BAD_QUESTIONS = [
    ({"image": "b.png", "text": "t"}, "missing field 'question_id'"),
    ({"question_id": None, "image": "b.png", "text": "t"}, "missing field 'question_id'"),
    ({"question_id": [1], "image": "b.png", "text": "t"}, "field 'question_id' must be int or str, got list"),
    ({"question_id": False, "image": "b.png", "text": "t"}, "field 'question_id' must be int or str, got bool"),
    ({"question_id": 1, "text": "t"}, "missing field 'image'"),
    ({"question_id": 1, "image": 5, "text": "t"}, "field 'image' must be str, got int"),
    ({"question_id": 1, "image": "b.png", "text": "t", "category": 3}, "field 'category' must be str, got int"),
    ({"question_id": 0, "image": "b.png", "text": "t"}, "duplicate question_id 0"),
]


@pytest.mark.parametrize("row,message", BAD_QUESTIONS, ids=[m for _, m in BAD_QUESTIONS])
def test_bad_question_names_the_jsonl_line(tmp_path, row, message):
    path = jsonl(tmp_path / "q.jsonl", [Q, row])
    with pytest.raises(DataError, match=f"q.jsonl: line 4: {message}"):
        read_questions(path)


@pytest.mark.parametrize("row,message", BAD_QUESTIONS[:3], ids=["no-id", "null-id", "list-id"])
def test_bad_question_names_the_json_list_item(tmp_path, row, message):
    (tmp_path / "q.json").write_text(json.dumps([Q, Q | {"question_id": 1}, row]))
    with pytest.raises(DataError, match=f"q.json: item 2: {message}"):
        read_questions(tmp_path / "q.json")


def test_non_object_row_is_named(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps(Q) + "\n[1, 2]\n")
    with pytest.raises(DataError, match="q.jsonl: line 2: expected a JSON object, got list"):
        read_questions(tmp_path / "q.jsonl")


def test_answers_accept_strings_objects_and_prefer_the_list(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [
        {"question_id": 1, "answers": [{"answer": "two"}, "2", {"answer": "Two", "answer_confidence": "yes"}]},
        {"question_id": 2, "answer": "ignored", "answers": ["used"]},
        {"question_id": "3", "answer": ""}])
    assert read_answers(path) == {1: ["two", "2", "Two"], 2: ["used"], "3": [""]}


@pytest.mark.parametrize("row,message", [
    ({"question_id": 1, "answers": "red"}, "field 'answers' must be list, got str"),
    ({"question_id": 1, "answers": None}, "missing field 'answers'"),
    ({"question_id": 1, "answers": ["red", {"text": "red"}]}, r"answers\[1\] must be a string or \{'answer': string\}"),
    ({"question_id": 1, "answers": [None]}, r"answers\[0\] must be a string"),
    ({"question_id": 1, "answer": ["red"]}, "field 'answer' must be str, got list"),
    ({"question_id": "x", "answer": "a"}, "duplicate question_id 'x'"),
])
def test_bad_answers_name_the_line(tmp_path, row, message):
    path = jsonl(tmp_path / "a.jsonl", [{"question_id": "x", "answer": "a"}, row], lead="")
    with pytest.raises(DataError, match=f"a.jsonl: line 2: {message}"):
        read_answers(path)


@pytest.mark.parametrize("row,message", [
    ({"question_id": 1}, "missing field 'text'"),
    ({"question_id": 1, "text": None}, "missing field 'text'"),
    ({"question_id": 1, "text": 2}, "field 'text' must be str, got int"),
])
def test_bad_predictions_name_the_line(tmp_path, row, message):
    path = jsonl(tmp_path / "p.jsonl", [{"question_id": 0, "text": "a"}, row])
    with pytest.raises(DataError, match=f"p.jsonl: line 4: {message}"):
        read_predictions(path)


def test_write_predictions_keeps_rows_exactly(tmp_path):
    rows = ({"question_id": i, "text": t, "latency_ms": i * 10} for i, t in enumerate(["röd", "", "2 \"big\""]))
    path = tmp_path / "out" / "p.jsonl"
    assert write_predictions(path, rows) == 3
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"question_id": 0, "text": "röd", "latency_ms": 0}'
    assert [json.loads(x) for x in lines][2] == {"question_id": 2, "text": '2 "big"', "latency_ms": 20}
    assert read_predictions(path) == {0: "röd", 1: "", 2: '2 "big"'}
    assert write_predictions(tmp_path / "empty.jsonl", []) == 0 and read_predictions(tmp_path / "empty.jsonl") == {}


@pytest.mark.parametrize("rows,message", [
    ([{"question_id": 0, "text": "a"}, {"question_id": 1}], "prediction 1: missing field 'text'"),
    ([{"question_id": True, "text": "a"}], "prediction 0: field 'question_id' must be int or str, got bool"),
    ([{"question_id": "a", "text": "x"}, {"question_id": "a", "text": "y"}], "prediction 1: duplicate question_id 'a'"),
])
def test_write_predictions_validates_before_writing(tmp_path, rows, message):
    path = tmp_path / "p.jsonl"
    path.write_text("old\n")
    with pytest.raises(DataError, match=f"p.jsonl: {message}"):
        write_predictions(path, rows)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]


@pytest.mark.parametrize("char", ["\u2028", "\x85"])
def test_predictions_with_unicode_line_separators_round_trip(tmp_path, char):
    write_predictions(tmp_path / "p.jsonl", [{"question_id": 0, "text": f"a{char}b"}, {"question_id": 1, "text": "c"}])
    assert read_predictions(tmp_path / "p.jsonl") == {0: f"a{char}b", 1: "c"}

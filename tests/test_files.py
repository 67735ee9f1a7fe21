"""Files: atomic writes never leave temporary or half-written files; readers name the file and line."""

import json

import pytest

from vitune.files import (
    DataError,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_json_records,
)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_writes_create_parents_and_leave_only_the_target(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    atomic_write_json(target, {"k": "é", "n": [1, 2]})
    assert json.loads(target.read_text(encoding="utf-8")) == {"k": "é", "n": [1, 2]}
    assert "é" in target.read_text(encoding="utf-8")  # not \u-escaped
    atomic_write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"b": "ü"}])
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == '{"a": 1}\n{"b": "ü"}\n'
    atomic_write_text(tmp_path / "t.txt", "x")
    atomic_write_text(tmp_path / "t.txt", "second")  # overwrite
    assert (tmp_path / "t.txt").read_text() == "second"
    assert names(tmp_path) == ["a", "rows.jsonl", "t.txt"]
    assert names(target.parent) == ["out.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "keep.bin"
    atomic_write_bytes(target, b"good")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails inside the write, after the temp file exists
    assert target.read_bytes() == b"good"
    assert names(tmp_path) == ["keep.bin"]


def test_atomic_dir_replaces_the_whole_folder(tmp_path):
    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        assert tmp != folder and tmp.parent == tmp_path and not folder.exists()
        (tmp / "old.txt").write_text("1")
    assert names(folder) == ["old.txt"]
    with atomic_dir(folder) as tmp:
        (tmp / "new.txt").write_text("2")
        assert names(folder) == ["old.txt"]  # the old folder stays in place until the block ends
    assert names(folder) == ["new.txt"]  # nothing of the old folder survives
    assert names(tmp_path) == ["model"]  # no temporary or moved-aside folders left


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_dir(folder) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash")
    assert (folder / "weights").read_text() == "good"
    assert names(tmp_path) == ["model"]


def test_reads_json_lists_and_jsonl_with_blank_lines(tmp_path):
    (tmp_path / "a.json").write_text('\n  [{"x": 1},\n {"x": 2}]\n')
    assert read_json_records(tmp_path / "a.json") == [{"x": 1}, {"x": 2}]
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n\n   \n{"x": 2}\n')
    assert read_json_records(tmp_path / "b.jsonl") == [{"x": 1}, {"x": 2}]
    (tmp_path / "empty.jsonl").write_text("")
    assert read_json_records(tmp_path / "empty.jsonl") == []


@pytest.mark.parametrize("name, content, match", [
    ("d.jsonl", '{"a": 1}\n\n{"a": 2,}\n', r"d\.jsonl: line 3: malformed JSON"),
    ("d.jsonl", '{"a": 1}\n[1, 2]\n', r"d\.jsonl: line 2: expected a JSON object, got list"),
    ("d.jsonl", '\n\n"text"\n', r"d\.jsonl: line 3: expected a JSON object, got str"),
    ("d.json", '[{"a": 1}, 7]', r"d\.json: item 1: expected a JSON object, got int"),
    ("d.json", '[\n{"a": 1},\n{"a": }\n]', r"d\.json: malformed JSON at line 3, column"),
])
def test_malformed_input_names_the_file_and_the_line(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        read_json_records(tmp_path / name)


def test_missing_and_non_utf8_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_json_records(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"a": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8"):
        read_json_records(tmp_path / "latin1.jsonl")

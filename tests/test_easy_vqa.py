"""easy-VQA conversion: image subset, copied files, records and answer categories."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from vitune.data.builtin.easy_vqa import answer_categories, convert_easy_vqa
from vitune.data.vqa_format import read_answers, read_questions
from vitune.files import DataError

EXPECTED = {"circle": "shape", "rectangle": "shape", "triangle": "shape", "yes": "yes/no", "no": "yes/no",
            "red": "color", "green": "color", "blue": "color", "black": "color", "gray": "color",
            "yellow": "color", "teal": "color", "brown": "color"}


@pytest.fixture(scope="module")
def ev():
    return pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def converted(ev, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("easy_vqa")
    convert_easy_vqa(out, max_train=12, max_test=6, seed=0)
    return out


def test_answer_categories(ev):
    assert answer_categories(ev.get_answers()) == EXPECTED
    with pytest.raises(DataError, match="purple"):
        answer_categories(["yes", "purple"])


def test_train_records_match_package(ev, converted):
    instruct = json.loads((converted / "instruct.json").read_text())
    images = sorted(p.name for p in (converted / "images").glob("train_*.png"))
    assert len(images) == 12
    ids = {int(name[len("train_"):-len(".png")]) for name in images}
    texts, answers, image_ids = ev.get_train_questions()
    expected = [(f"<image>\n{t}", a, f"images/train_{i:05d}.png")
                for t, a, i in zip(texts, answers, image_ids, strict=True) if i in ids]
    got = [(r["conversations"][0]["value"], r["conversations"][1]["value"], r["image"]) for r in instruct]
    assert got == expected and len(got) > 12
    assert len({r["id"] for r in instruct}) == len(instruct)
    sources = ev.get_train_image_paths()
    for r in instruct:
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
        image_id = int(Path(r["image"]).stem.removeprefix("train_"))
        assert (converted / r["image"]).read_bytes() == Path(sources[image_id]).read_bytes()


def test_test_split(converted):
    questions = read_questions(converted / "test_questions.jsonl")
    answers = read_answers(converted / "test_answers.jsonl")
    assert len({q.image for q in questions}) == 6 and set(answers) == {q.question_id for q in questions}
    for q in questions:
        assert (converted / q.image).is_file()
        assert q.category == EXPECTED[answers[q.question_id][0]]
    assert set(Counter(q.category for q in questions)) == {"shape", "color", "yes/no"}
    meta = json.loads((converted / "meta.json").read_text())
    assert (meta["n_train_images"], meta["n_test_images"], meta["n_test_questions"]) == (12, 6, len(questions))


def test_subset_is_seeded(ev, tmp_path):
    def images(seed, name):
        convert_easy_vqa(tmp_path / name, max_train=5, max_test=2, seed=seed)
        return sorted(p.name for p in (tmp_path / name / "images").iterdir())

    assert images(0, "a") == images(0, "b") != images(1, "c")


def test_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # makes `import easy_vqa` raise ImportError
    with pytest.raises(ImportError, match=r"pip install easy-vqa==1\.0"):
        convert_easy_vqa(tmp_path)


def test_captions_come_from_each_images_own_answers(converted):
    instruct = json.loads((converted / "instruct.json").read_text())
    captions = json.loads((converted / "captions.json").read_text())
    answers: dict[str, set] = {}
    for r in instruct:
        answers.setdefault(r["image"], set()).add(r["conversations"][1]["value"])
    assert captions and len({c["image"] for c in captions}) == len(captions)
    for c in captions:
        _, color, shape = c["conversations"][1]["value"].rstrip(".").split()
        assert c["conversations"][0]["value"] == "<image>" and {color, shape} <= answers[c["image"]]
    assert json.loads((converted / "meta.json").read_text())["n_captions"] == len(captions)

"""Evaluation: the VQA pipeline (`vitune.evaluation.answering`: batching by image, answers in
question order; `predict`: files in; `runner`: scores out) and the exact-match metrics beyond
tests/test_vqa_metrics.py (several references, empty and category edge cases, table layout)."""

import dataclasses
import json

import pytest
from PIL import Image

from vitune.checkpoints.model_folder import save_pretrained
from vitune.data.tokenizer import IMAGE_SLOT
from vitune.data.vqa_format import Question, read_predictions
from vitune.evaluation.answering import VQA_GENERATION, _batches, predict_vqa
from vitune.evaluation.metrics import (
    UNCATEGORISED,
    CategoryScore,
    format_table,
    is_correct,
    vqa_exact_match,
)
from vitune.evaluation.predict import run_predict
from vitune.evaluation.runner import TASKS, eval_vqa
from vitune.files import DataError

# -- metrics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, references, ok", [
    ("Two", ["2"], True),
    ("2", "two", True),                      # a single reference string
    ("blue", ["red", "Blue."], True),        # any reference matches
    ("blue", ["red", "green"], False),
    ("red circle", ["red"], False),          # exact match, not containment
    ("yes, it is", ["yes it is"], False),    # inner punctuation is kept
    ("", ["red"], False),
])
def test_is_correct(prediction, references, ok):
    refs = [references] if isinstance(references, str) else references
    assert is_correct(prediction, refs) is ok


def test_scoring_nothing_is_an_error():
    with pytest.raises(ValueError, match="no reference answers to score against"):
        vqa_exact_match({1: "red"}, {})


def test_unknown_and_absent_categories_are_grouped_as_uncategorised():
    answers = {1: ["red"], 2: ["2"], 3: ["yes"]}
    r = vqa_exact_match({1: "red", 2: "2", 3: "no"}, answers, {1: "color", 3: None})  # 2: not listed
    assert {c: (s.n, s.correct) for c, s in r.per_category.items()} == {UNCATEGORISED: (2, 1), "color": (1, 1)}
    assert list(r.per_category) == sorted(r.per_category)  # the table order is sorted
    assert sum(s.n for s in r.per_category.values()) == r.n == 3


def test_table_without_categories_and_with_a_long_name():
    plain = format_table(vqa_exact_match({1: "x"}, {1: ["x"]})).splitlines()
    assert plain == ["category       n  accuracy", "-" * 26, "overall        1    100.0%"]
    wide = format_table(vqa_exact_match({1: "x", 2: "x"}, {1: ["x"], 2: ["y"]}, {1: "a-long-category", 2: "b"}))
    lines = wide.splitlines()
    assert [len(line) for line in lines] == [len(lines[0])] * 5  # columns widen to the longest name
    assert lines[1].startswith("a-long-category ") and lines[1].endswith("100.0%")
    assert lines[2].split() == ["b", "1", "0.0%"] and lines[4].split() == ["overall", "2", "50.0%"]


# -- runner -----------------------------------------------------------------------------------------

def q(qid, image, text="what?", category=None):
    return Question(qid, image, text, category)


@pytest.mark.parametrize("images, batch_size, want", [
    (["a", "b", "a", "c"], 2, [[0, 2], [1, 3]]),                       # a's two questions together
    (["a"] * 5, 2, [[0, 1], [2, 3], [4]]),                             # one image's group split
    (["a", "b", "c"], 32, [[0, 1, 2]]),                                # singles batched together
    (["a", "b", "b", "c", "d", "e"], 2, [[1, 2], [0, 3], [4, 5]]),
    ([], 4, []),
])
def test_batches_group_questions_by_image(images, batch_size, want):
    questions = [q(i, im) for i, im in enumerate(images)]
    got = _batches(questions, batch_size)
    assert [[x.question_id for x in b] for b in got] == want


class FakeAssistant:
    """Answers each request with its question and the id of its image object; records the batches."""

    def __init__(self):
        self.batches = []

    def answer_batch(self, reqs, gen):
        self.batches.append((reqs, gen))
        return [f"{r.messages[-1].text}|{id(r.images[0])}" for r in reqs]


@pytest.fixture
def images(tmp_path):
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
    return tmp_path


def test_predict_answers_in_question_order_loading_each_image_once(images):
    questions = [q(0, "a.png", "zero"), q("x", "b.png", "one"), q(2, "a.png", "two")]
    fake = FakeAssistant()
    rows = predict_vqa(fake, questions, images, batch_size=8, progress=False)
    assert [r["question_id"] for r in rows] == [0, "x", 2]
    texts = [r["text"].split("|") for r in rows]
    assert [t[0] for t in texts] == [f"{IMAGE_SLOT}\n{w}" for w in ("zero", "one", "two")]  # the image first
    assert texts[0][1] == texts[2][1] != texts[1][1]  # one image object per file: shared prefixes stay possible
    assert len(fake.batches) == 2 and all(gen == VQA_GENERATION for _, gen in fake.batches)
    reqs = fake.batches[0][0]
    assert [len(r.images) for r in reqs] == [1, 1] and reqs[0].images[0].getpixel((0, 0)) == (255, 0, 0)


def test_predict_names_the_question_of_a_missing_image(images):
    with pytest.raises(DataError, match=r"question 'q7': image not found: .*nope.png"):
        predict_vqa(FakeAssistant(), [q("q7", "nope.png")], images, progress=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_reads_the_files_and_scores_per_category(tmp_path):
    qs = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "a.png", "text": "colour?", "category": "color"},
        {"question_id": 2, "image": "a.png", "text": "how many?", "category": "count"},
        {"question_id": 3, "image": "b.png", "text": "colour?", "category": "color"}])
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "answer": "red"},
                                             {"question_id": 2, "answers": ["2", "two"]},
                                             {"question_id": 3, "answer": "blue"}])
    r = TASKS["vqa"](str(qs), str(ans), {1: "Red.", 2: "two", 3: "green", 9: "extra"})
    assert (r.n, r.correct, r.n_extra, r.missing) == (3, 2, 1, ())
    assert r.per_category == {"color": CategoryScore(2, 1), "count": CategoryScore(1, 1)}


def test_eval_without_categories_has_no_breakdown(tmp_path):
    qs = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "a.png", "text": "?"},
                                            {"question_id": 2, "image": "a.png", "text": "?"}])
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}])
    r = eval_vqa(str(qs), str(ans), {2: "yes"})
    assert (r.per_category, r.missing, r.accuracy) == ({}, (1,), 0.0)
    with pytest.raises(DataError, match="holds no predictions"):  # nothing to score is an error, not 0 %
        eval_vqa(str(qs), str(ans), {})


def test_run_predict_with_a_model_folder_and_an_image_root(tok, images, tmp_path, one_thread):
    import torch

    from vitune.model.vlm import VLM
    from vitune.presets import tiny

    torch.manual_seed(0)
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size))
    model_dir = save_pretrained(VLM(cfg, tok.special.image), tok, tmp_path / "model")
    qdir = tmp_path / "questions"
    qdir.mkdir()
    qs = write_jsonl(qdir / "q.jsonl", [{"question_id": i, "image": im, "text": "colour?"}
                                        for i, im in enumerate(["a.png", "b.png", "a.png"])])
    out = tmp_path / "preds.jsonl"
    assert run_predict(str(model_dir), str(qs), str(out), image_root=str(images), progress=False).n == 3
    preds = read_predictions(out)
    assert sorted(preds) == [0, 1, 2] and all(isinstance(t, str) for t in preds.values())
    with pytest.raises(DataError, match="question 0: image not found"):  # default root: the questions' folder
        run_predict(str(model_dir), str(qs), str(tmp_path / "p2.jsonl"), progress=False)

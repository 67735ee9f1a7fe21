"""The evaluation-suite metrics against hand-computed cases: VQA answer normalisation and accuracy
(`answers`), Wilson intervals and paired run comparison (`intervals`), Recall@K (`retrieval`),
multiple-choice letters (`choice`) and POPE probes and metrics (`pope`)."""

import math

import numpy as np
import pytest
import torch

from vitune.data.builtin.shapes import _scene_record
from vitune.data.builtin.shapes_scene import make_scene
from vitune.data.vqa_format import read_answers, read_questions
from vitune.evaluation.answers import CONTRACTIONS, vqa_accuracy, vqa_normalize
from vitune.evaluation.choice import extract_letter, score_choices
from vitune.evaluation.intervals import Accuracy, compare, mcnemar_p, wilson
from vitune.evaluation.pope import make_probes, pope_metrics, probe_text
from vitune.evaluation.retrieval import recall_at_k
from vitune.files import atomic_write_jsonl

# -- answers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, want", [
    ("Yes!", "yes"), ("  The Two dogs. ", "2 dogs"), ("an apple", "apple"), ("theory", "theory"),
    ("none", "0"), ("ten", "10"), ("eleven", "eleven"), ("what is it?\n", "what is it"),
    ("1,000", "1000"),                       # a comma between digits goes
    ("1,000 (approx)", "1000 approx"),       # ... and then all punctuation is removed, not spaced
    ("red,blue", "red blue"), ("red, blue", "red blue"), ("black-and-white", "black and white"),
    ("(yes)", "yes"), ("3.5", "3.5"), ("dog.", "dog"), ("u.s.", "us"),  # a period stays before a digit only
    ("dont", "don't"), ("isnt", "isn't"), ("couldntve", "couldn't've"), ("couldnt've", "couldn't've"),
    ("Its", "its"), ("well", "well"), ("it's", "it's"), ("ratio 3:4", "ratio 3:4"),  # colons are kept
])
def test_vqa_normalize(raw, want):
    assert vqa_normalize(raw) == want


def test_contractions_table_restores_the_apostrophe_only():
    assert all("'" in v and v.replace("'", "") == k.replace("'", "") for k, v in CONTRACTIONS.items())
    assert {"dont", "wont", "cant", "youre", "im", "twas"} <= set(CONTRACTIONS)
    assert not {"its", "well", "were", "ill", "shed", "lets", "hell"} & set(CONTRACTIONS)


def ten(matching, n_match, other="cat"):
    return [matching] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize("n_match, want", [
    (0, 0.0), (1, 0.3), (2, 0.6),            # (m * min(1, (m-1)/3) + (10-m) * m/3) / 10
    (3, 0.9),                                # (3 * 2/3 + 7 * 1) / 10
    (4, 1.0), (10, 1.0),
])
def test_vqa_accuracy_ten_references(n_match, want):
    assert vqa_accuracy("dog", ten("dog", n_match)) == pytest.approx(want)


@pytest.mark.parametrize("prediction, references, want", [
    ("Two", ["2"], 1.0), ("the dog.", ["dog"], 1.0), ("yes", ["Yes!"], 1.0), ("no", ["yes"], 0.0),
    ("2", ["2", "two"], 1.0),                # fewer than 10: any match is full credit (not 2/3)
    ("cat", ["dog", "bird", "cat"], 1.0), ("cow", ["dog", "bird", "cat"], 0.0),
    ("dog", ["dog"] + ["cat"] * 10, 1.0),    # 11 references: the any-match rule too
    ("2", ["Two", "2", "two.", *["3"] * 7], 0.9),  # normalisation merges three references
])
def test_vqa_accuracy_other_counts(prediction, references, want):
    assert vqa_accuracy(prediction, references) == pytest.approx(want)


@pytest.mark.parametrize("references", [[], "dog"])
def test_vqa_accuracy_needs_a_reference_list(references):
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("dog", references)


# -- intervals --------------------------------------------------------------------------------------

def test_wilson_known_values():
    assert [round(x, 4) for x in wilson(50, 100)] == [0.4038, 0.5962]
    low, high = wilson(0, 10)  # k = 0: high = (z²/n) / (1 + z²/n)
    assert low == 0.0 and high == pytest.approx(0.38416 / 1.38416)
    assert wilson(10, 10) == pytest.approx((1 - 0.38416 / 1.38416, 1.0))
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(50, 100, z=0)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_accuracy_format():
    assert str(Accuracy(356, 500)) == "71.2 % (n=500, 95 % CI 67.1-75.0)"  # Wilson: 0.67081, 0.74996
    assert str(Accuracy(0, 0)) == "0.0 % (n=0, 95 % CI 0.0-100.0)"
    assert Accuracy(2.5, 10).value == 0.25  # a sum of soft scores


def test_mcnemar_exact():
    assert mcnemar_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)  # 0.0386
    assert mcnemar_p(2, 10) == mcnemar_p(10, 2)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0  # 2 * 42/64 capped at 1
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)


def test_compare_identical_runs_is_no_difference():
    a = {i: float(i % 2) for i in range(50)}
    c = compare(a, dict(a))
    assert (c.n, c.difference, c.low, c.high, c.p_value) == (50, 0.0, 0.0, 0.0, 1.0)
    assert not c.significant


def test_compare_a_real_difference_and_noise():
    a = {i: 0.0 if i in (10, 11) else 1.0 for i in range(100)}  # 10, 11: wrong in a, right in b
    b = {i: 0.0 if i < 10 else 1.0 for i in range(100)}  # 0-9: right in a, wrong in b
    c = compare(a, b)
    assert (c.only_a, c.only_b) == (10, 2) and c.p_value == pytest.approx(0.03857, abs=1e-5)
    assert c.difference == pytest.approx(-0.08) and c.low <= -0.08 <= c.high
    assert c.high < 0 and c.significant
    assert compare(a, b) == c  # seeded
    one = compare({i: 1.0 for i in range(100)}, {i: float(i > 0) for i in range(100)})  # one question lost
    assert one.high == 0.0 and not one.significant and one.p_value == 1.0


def test_compare_soft_scores_common_questions_only():
    c = compare({1: 0.0, 2: 0.0, 3: 0.3, "x": 1.0}, {1: 0.5, 2: 0.5, 3: 0.8, "y": 0.0})
    assert (c.n, c.n_only_in_a, c.n_only_in_b) == (3, 1, 1)
    assert (c.mean_a, c.mean_b) == pytest.approx((0.1, 0.6))
    assert (c.low, c.high) == pytest.approx((0.5, 0.5)) and c.significant  # every difference is 0.5
    assert c.p_value is None  # not 0/1 scores: no McNemar
    with pytest.raises(ValueError, match="no scored question in common"):
        compare({1: 1.0}, {2: 1.0})


# -- retrieval --------------------------------------------------------------------------------------

def unit(*degrees):
    return np.array([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_recall_at_k_by_angle():
    images = unit(0, 90, 180)
    texts = unit(10, 80, 30, 100, 170)
    owner = [0, 1, 2, 1, 0]
    r = recall_at_k(images, texts, owner, ks=(1, 3, 5))
    # t2i ranks: t0 0, t1 0, t2 2 (30° is nearer 0° and 90° than 180°), t3 0, t4 2 (170° is nearest 180°)
    assert r.t2i == pytest.approx({1: 3 / 5, 3: 1.0, 5: 1.0})
    # i2t: i0 by t0 (its far t4 does not matter), i1 by t1/t3, i2: t4, t3, t1 are nearer than t2
    assert r.i2t == pytest.approx({1: 2 / 3, 3: 2 / 3, 5: 1.0})
    assert (r.n_i2t, r.n_t2i, r.n_images) == (3, 5, 3)
    scaled = recall_at_k(torch.tensor(images * 7.0), torch.tensor(texts * 0.1), owner, ks=(1, 3, 5))
    assert scaled == r  # cosine: scale does not matter; tensors accepted


def test_recall_ties_are_pessimistic_and_textless_images_skipped():
    same = unit(0, 0)
    r = recall_at_k(same, same, [0, 1], ks=(1, 2))
    assert r.i2t == {1: 0.0, 2: 1.0} and r.t2i == {1: 0.0, 2: 1.0}
    r = recall_at_k(unit(0, 90, 45), unit(0, 90), [0, 1], ks=(1,))
    assert r.n_i2t == 2 and r.i2t == {1: 1.0} and r.t2i == {1: 1.0}


@pytest.mark.parametrize("images, texts, owner, ks, message", [
    (unit(0), unit(0), [1], (1,), "text_to_image"),
    (unit(0), unit(0, 1), [0], (1,), "text_to_image"),
    (np.zeros((1, 2)), unit(0), [0], (1,), "non-zero norm"),
    (unit(0), np.ones((1, 3)), [0], (1,), "embedding sizes differ"),
    (unit(0), unit(0), [0], (0,), "ks must be"),
])
def test_recall_refuses_bad_input(images, texts, owner, ks, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(images, texts, owner, ks)


# -- multiple choice --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("b", "B"), ("(B).", "B"), (" C ", "C"), ("B. a dog", "B"), ("(B) a dog", "B"), ("B: dog", "B"),
    ("B)", "B"), ("I think (B) is right", "B"), ("[C]", "C"), ("Answer: B", "B"), ("the answer is (C)", "C"),
    ("The answer is B because it is red", "B"), ("ANSWER IS D", "D"), ("The correct choice - C", "C"),
    ("Answer: B. (B) is red", "B"),          # the same letter twice is one
    ("A dog", None), ("a dog", None),        # an article, not an option
    ("(A) or (B)", None), ("Answer: A, not (B)", None),  # two different letters
    ("A or B", None), ("option c", None), ("Bob", None), ("", None), ("E", None), ("Answer: E", None),
])
def test_extract_letter(text, want):
    assert extract_letter(text) == want


def test_extract_letter_other_letters():
    assert extract_letter("E", "ABCDE") == "E" and extract_letter("(E)", "ABCDE") == "E"
    assert extract_letter("D", "ABC") is None
    with pytest.raises(ValueError):
        extract_letter("A", "abc")


def test_score_choices():
    answers = {1: "A", 2: "B", 3: "C", 4: "d", 5: "A"}
    predictions = {1: "A", 2: "(C)", 3: "I pick A or C", 4: "Answer: D", 99: "B"}
    r = score_choices(predictions, answers)
    assert (r.n, r.correct, r.accuracy) == (5, 2, 0.4)
    assert r.unparseable == (3,) and r.missing == (5,) and r.n_extra == 1
    with pytest.raises(ValueError, match="answer keys"):
        score_choices({1: "A"}, {1: "E"})
    with pytest.raises(ValueError, match="no answer key"):
        score_choices({1: "A"}, {})


# -- POPE -------------------------------------------------------------------------------------------

def test_pope_metrics_hand_table():
    answers = {1: "yes", 2: "yes", 3: "yes", 4: "yes", 5: "no", 6: "no", 7: "no", 8: "no", 9: ["yes"]}
    predictions = {1: "yes", 2: "Yes.", 3: "yes", 4: "no", 5: "yes", 6: "no", 7: "No!", 8: "maybe"}  # 9 missing
    r = pope_metrics(predictions, answers)
    assert (r.tp, r.fn, r.fp, r.tn, r.n) == (3, 2, 1, 2, 9)  # fn: 4 ("no") and 9 (missing)
    assert r.accuracy == pytest.approx(5 / 9) and r.precision == pytest.approx(3 / 4)
    assert r.recall == pytest.approx(3 / 5) and r.f1 == pytest.approx(2 / 3)
    assert r.yes_ratio == pytest.approx(4 / 9)
    assert r.unparseable == (8,) and r.missing == (9,)
    nothing = pope_metrics({1: "maybe", 2: "yes, there is"}, {1: "yes", 2: "no"})
    assert (nothing.precision, nothing.recall, nothing.f1, nothing.accuracy) == (0.0, 0.0, 0.0, 0.0)
    assert nothing.unparseable == (1, 2)


@pytest.mark.parametrize("answers", [{1: "maybe"}, {1: ["yes", "no"]}, {}])
def test_pope_metrics_refuses_bad_references(answers):
    with pytest.raises(ValueError):
        pope_metrics({1: "yes"}, answers)


R, B, G, Y, P = ("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"), ("purple", "square")
# frequency: R 5, B 4, G 4, P 3, Y 2. Scene 0 holds P and Y; absent: B, G, R.
# co-occurrence with P and Y: G 1 + 1 (scenes 5, 4), B 1 + 0 (scene 7), R 0.
HAND = [[Y, P], [R, B], [R, B], [R, G], [Y, G], [P, G], [R, B], [P, B], [R, G]]


def hand_scenes():
    return [{"image": f"s{i}.png", "objects": [{"color": c, "shape": s} for c, s in objs]}
            for i, objs in enumerate(HAND)]


def asked(probes, image, answer):
    by_id = {a["question_id"]: a["answer"] for a in probes.answers}
    return {q["text"] for q in probes.questions if q["image"] == image and by_id[q["question_id"]] == answer}


@pytest.mark.parametrize("sampling, n, want", [
    ("popular", 2, [R]),                     # the most frequent absent object
    ("popular", 4, [R, B]),                  # then B and G tie at 4: blue before green
    ("adversarial", 2, [G]),                 # co-occurs twice: summed over both present objects
    ("adversarial", 4, [G, B]),
])
def test_pope_samplers_hand_scenes(sampling, n, want):
    probes = make_probes(hand_scenes(), n_per_image=n, sampling=sampling, seed=3)
    assert asked(probes, "s0.png", "no") == {probe_text(o) for o in want}
    assert len(asked(probes, "s0.png", "yes")) == n // 2
    assert all(q["category"] == sampling for q in probes.questions)


def test_pope_random_sampler_and_shapes_scenes(tmp_path):
    rng = np.random.default_rng(0)
    scenes = [_scene_record("test", f"images/test_{i:05d}.png", make_scene(rng)) for i in range(40)]
    probes = make_probes(scenes, n_per_image=4, sampling="random", seed=1, first_id=100)
    assert make_probes(scenes, n_per_image=4, sampling="random", seed=1, first_id=100) == probes
    assert make_probes(scenes, n_per_image=4, sampling="random", seed=2, first_id=100) != probes
    answers = [a["answer"] for a in probes.answers]
    assert answers.count("yes") == answers.count("no") == 80  # every scene has 2+ objects: 2 + 2 each
    assert [q["question_id"] for q in probes.questions] == list(range(100, 260))
    present = {s["image"]: {probe_text((o["color"], o["shape"])) for o in s["objects"]} for s in scenes}
    for q, a in zip(probes.questions, probes.answers, strict=True):
        assert (q["text"] in present[q["image"]]) == (a["answer"] == "yes")
    atomic_write_jsonl(tmp_path / "q.jsonl", list(probes.questions))
    atomic_write_jsonl(tmp_path / "a.jsonl", list(probes.answers))
    assert len(read_questions(tmp_path / "q.jsonl")) == 160
    oracle = {qid: refs[0] for qid, refs in read_answers(tmp_path / "a.jsonl").items()}
    assert pope_metrics(oracle, read_answers(tmp_path / "a.jsonl")).f1 == 1.0
    assert probe_text(("orange", "square")) == "Is there an orange square in the image?"


@pytest.mark.parametrize("kwargs", [{"sampling": "frequent"}, {"n_per_image": 3}, {"n_per_image": 0}])
def test_make_probes_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_probes(hand_scenes(), **kwargs)


def test_make_probes_balances_within_what_an_image_allows():
    scenes = [{"image": "full.png", "objects": [{"color": "red", "shape": "circle"},
                                                 {"color": "blue", "shape": "square"}]},
              {"image": "one.png", "objects": [{"color": "red", "shape": "circle"}]}]
    probes = make_probes(scenes, n_per_image=4, sampling="random")
    assert [q["image"] for q in probes.questions] == ["one.png"] * 2  # full.png: no absent object to ask about
    assert asked(probes, "one.png", "yes") == {probe_text(R)} and asked(probes, "one.png", "no") == {probe_text(B)}

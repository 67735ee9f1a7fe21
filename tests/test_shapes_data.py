"""Shapes data set: scenes, rendering, questions/answers and the files `generate_shapes` writes.

Answers are checked against a reference written here independently: it parses the question
*text* and re-derives the answer from the scene's objects, with its own position table.
"""

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitune.data.builtin.shapes import DESCRIBE, generate_shapes
from vitune.data.builtin.shapes_scene import (
    CATEGORIES,
    COLORS,
    RELATIONAL,
    Scene,
    SceneObject,
    caption,
    make_question,
    make_scene,
    question_text,
    render_scene,
    scene_answer,
)
from vitune.data.vqa_format import read_answers, read_questions

GRID = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
PATTERNS = {
    "color": r"What color is the (?P<shape>\w+) at the (?P<pos>[a-z ]+)\?",
    "shape": r"What shape is the (?P<color>\w+) object at the (?P<pos>[a-z ]+)\?",
    "size": r"What size is the (?P<color>\w+) (?P<shape>\w+)\?",
    "position": r"Where is the (?P<color>\w+) (?P<shape>\w+)\?",
    "existence": r"Is there an? (?P<color>\w+) (?P<shape>\w+)\?",
    "count": r"How many (?:objects|(?P<color>\w+) objects|(?P<shape>\w+)s) are there\?",
    "spatial": r"Is the (?P<color>\w+) (?P<shape>\w+) (?P<rel>left of|right of|above|below) "
               r"the (?P<color2>\w+) (?P<shape2>\w+)\?",
    "closest": r"What (?P<ask>color|shape) is the object closest to the (?P<color>\w+) (?P<shape>\w+)\?",
    "furthest": r"What (?P<ask>color|shape) is the object furthest from the (?P<color>\w+) (?P<shape>\w+)\?",
    "same": r"How many other objects have the same (?P<by>color|shape) as the (?P<color>\w+) (?P<shape>\w+)\?",
}


def parse_category(text: str) -> str:
    cats = [c for c, p in PATTERNS.items() if re.fullmatch(p, text)]
    assert len(cats) == 1, f"question matches {cats}: {text!r}"
    return cats[0]


def reference_answer(objects: list[dict], text: str) -> str:
    cat = parse_category(text)
    m = re.fullmatch(PATTERNS[cat], text).groupdict()
    at = {GRID[o["cell"]]: o for o in objects}
    named = [o for o in objects if o["color"] == m.get("color") and o["shape"] == m.get("shape")]
    if cat == "color":
        assert at[m["pos"]]["shape"] == m["shape"]
        return at[m["pos"]]["color"]
    if cat == "shape":
        assert at[m["pos"]]["color"] == m["color"]
        return at[m["pos"]]["shape"]
    if cat == "existence":
        return "yes" if named else "no"
    if cat == "count":
        return str(sum(m["color"] in (None, o["color"]) and m["shape"] in (None, o["shape"]) for o in objects))
    (a,) = named
    if cat in ("closest", "furthest"):  # by (x, y) cell centres, ties refused
        others = [o for o in objects if o is not a]
        d = {id(o): (o["cell"] % 3 - a["cell"] % 3) ** 2 + (o["cell"] // 3 - a["cell"] // 3) ** 2 for o in others}
        target = (min if cat == "closest" else max)(d.values())
        (found,) = [o for o in others if d[id(o)] == target]
        assert len(others) >= 2, "a closest / furthest question needs two other objects"
        return found[m["ask"]]
    if cat == "same":
        return str(sum(o is not a and o[m["by"]] == a[m["by"]] for o in objects))
    if cat == "size":
        return a["size"]
    if cat == "position":
        return GRID[a["cell"]]
    (b,) = [o for o in objects if o["color"] == m["color2"] and o["shape"] == m["shape2"]]
    row, col = (lambda o: o["cell"] // 3), (lambda o: o["cell"] % 3)
    holds = {"left of": col(a) < col(b), "right of": col(a) > col(b), "above": row(a) < row(b),
             "below": row(a) > row(b)}[m["rel"]]
    return "yes" if holds else "no"


def objects_of(scene: Scene) -> list[dict]:
    return [dataclasses.asdict(o) for o in scene.objects]


def random_scenes(n: int, seed: int = 1) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng) for _ in range(n)]


def test_scene_invariants():
    for scene in random_scenes(300):
        objs = scene.objects
        assert 2 <= len(objs) <= 4
        assert [o.cell for o in objs] == sorted({o.cell for o in objs})  # distinct, raster order
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        for o in objs:
            assert abs(o.cx - (o.cell % 3 + 0.5) * 32) <= 3 and abs(o.cy - (o.cell // 3 + 0.5) * 32) <= 3


def test_caption_format():
    scene = Scene((SceneObject("red", "circle", "small", 0, 16, 16), SceneObject("blue", "square", "large", 4, 48, 48),
                   SceneObject("green", "triangle", "small", 8, 80, 80)), 96)
    assert caption(scene) == ("top left: small red circle; top: empty; top right: empty; left: empty; "
                              "center: large blue square; right: empty; bottom left: empty; bottom: empty; "
                              "bottom right: small green triangle.")


def test_render_matches_scene():
    rng = np.random.default_rng(3)
    for scene in random_scenes(40, seed=2):
        px = np.asarray(render_scene(scene, rng), dtype=int)  # (H, W, 3)
        assert px.shape == (96, 96, 3)
        for o in scene.objects:
            assert np.abs(px[round(o.cy), round(o.cx)] - COLORS[o.color]).max() <= 8, o
            r, c = divmod(o.cell, 3)
            cell = px[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
            area = (np.abs(cell - COLORS[o.color]).max(axis=-1) <= 20).sum()
            assert (area <= 100) if o.size == "small" else (area >= 120), (o, area)
        for cell in set(range(9)) - {o.cell for o in scene.objects}:
            r, c = divmod(cell, 3)
            assert px[r * 32 + 16, c * 32 + 16].min() >= 240


def test_answers_match_independent_reference():
    rng = np.random.default_rng(4)
    for scene in random_scenes(200, seed=5):
        for cat in CATEGORIES + RELATIONAL:
            spec = make_question(scene, cat, rng)
            if spec is None:
                assert cat in ("closest", "furthest"), cat
                continue
            text = question_text(spec)
            assert parse_category(text) == cat
            assert scene_answer(scene, spec) == reference_answer(objects_of(scene), text), text


@pytest.mark.parametrize("category", ["existence", "spatial"])
def test_yes_no_balanced(category):
    rng = np.random.default_rng(6)
    answers = Counter(scene_answer(s, make_question(s, category, rng)) for s in random_scenes(1000, seed=7))
    assert set(answers) == {"yes", "no"}
    assert 0.45 <= answers["yes"] / 1000 <= 0.55, answers


def test_counts_include_zero():
    rng = np.random.default_rng(8)
    answers: dict[str, Counter] = {"color": Counter(), "shape": Counter(), "all": Counter()}
    for scene in random_scenes(900, seed=9):
        spec = make_question(scene, "count", rng)
        answers[spec.count_by][scene_answer(scene, spec)] += 1
    assert all(set(c) <= {"0", "1", "2", "3", "4"} for c in answers.values()), answers
    assert answers["color"]["0"] > 20 and answers["shape"]["0"] > 20 and set(answers["all"]) == {"2", "3", "4"}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, n_train=80, n_test=21, seed=0)
    return out


def load(path: Path):
    return json.loads(path.read_text()) if path.suffix == ".json" else [json.loads(x) for x in path.open()]


def test_files_and_relative_images(shapes_dir):
    meta = load(shapes_dir / "meta.json")
    assert (meta["n_train"], meta["n_test"], meta["seed"]) == (80, 21, 0)
    assert meta["categories"] == list(CATEGORIES + RELATIONAL) and meta["relational"] is True
    align, instruct = load(shapes_dir / "align.json"), load(shapes_dir / "instruct.json")
    assert len(align) == 80 and len(instruct) == meta["n_instruct"]
    questions = read_questions(shapes_dir / "test_questions.jsonl")
    for rec in align + instruct + [{"image": q.image} for q in questions]:
        assert not Path(rec["image"]).is_absolute() and (shapes_dir / rec["image"]).is_file()
    assert align[0]["id"] == "shapes-train-00000-caption"
    assert align[0]["conversations"][0] == {"from": "human", "value": "<image>"}
    assert Image.open(shapes_dir / align[0]["image"]).size == (96, 96)
    scenes = load(shapes_dir / "scenes.jsonl")
    train = {json.dumps(r["objects"]) for r in scenes if r["split"] == "train"}
    test = {json.dumps(r["objects"]) for r in scenes if r["split"] == "test"}
    assert len(train) == 80 and len(test) == 21 and not train & test  # splits drawn independently


def test_instruct_conversations(shapes_dir):
    instruct = load(shapes_dir / "instruct.json")
    scenes = {r["image"]: r["objects"] for r in load(shapes_dir / "scenes.jsonl")}
    assert len({r["id"] for r in instruct}) == len(instruct)
    asked: dict[str, list[str]] = {}  # image → every question asked about it, chats and singles
    for rec in instruct:
        qs = [t["value"].removeprefix("<image>\n") for t in rec["conversations"][0::2]]
        asked.setdefault(rec["image"], []).extend(qs)
    assert all(len(set(qs)) == len(qs) for qs in asked.values())  # singles are fresh questions
    chats = [r for r in instruct if len(r["conversations"]) > 2 or DESCRIBE in r["conversations"][0]["value"]]
    relational = [r for r in instruct if "-relational-" in r["id"]]
    assert 8 <= len(chats) <= 35 and len(instruct) - len(chats) - len(relational) == 3 * 80  # 3 singles an image
    per_image = Counter(r["image"] for r in relational)
    assert max(per_image.values()) == 2 and len(relational) >= 80  # up to 2 an image, distinct categories
    asked = [r["conversations"][0]["value"].removeprefix("<image>\n") for r in relational]
    assert all(parse_category(q) in RELATIONAL for q in asked)
    describe = 0
    for rec in instruct:
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])
        qs = [t["value"].removeprefix("<image>\n") for t in conv[0::2]]
        assert len(set(qs)) == len(qs), qs
        describe += DESCRIBE in qs
        qa = [(q, a["value"]) for q, a in zip(qs, conv[1::2], strict=True) if q != DESCRIBE]
        assert len({parse_category(q) for q, _ in qa}) == len(qa)
        if len(conv) > 2:
            assert 2 <= len(qa) <= 3 and (DESCRIBE not in qs or qs[-1] == DESCRIBE)
        for q, a in qa:
            assert a == reference_answer(scenes[rec["image"]], q), (rec["id"], q)
    assert 2 <= describe <= len(chats) - 2  # about half of the chats


def test_test_split_balanced_and_correct(shapes_dir):
    questions = read_questions(shapes_dir / "test_questions.jsonl")
    answers = read_answers(shapes_dir / "test_answers.jsonl")
    scenes = {r["image"]: r["objects"] for r in load(shapes_dir / "scenes.jsonl")}
    assert set(answers) == {q.question_id for q in questions}
    first, relational = questions[:21 * 6], questions[21 * 6:]
    assert Counter(q.category for q in first) == {c: 18 for c in CATEGORIES}
    assert all(n == 6 for n in Counter(q.image for q in first).values())
    assert {q.category for q in relational} == set(RELATIONAL) and 21 <= len(relational) <= 42
    assert max(Counter(q.image for q in relational).values()) == 2
    for q in questions:
        assert parse_category(q.text) == q.category
        assert answers[q.question_id] == [reference_answer(scenes[q.image], q.text)]
    for cat in ("existence", "spatial"):
        yes = Counter(answers[q.question_id][0] for q in questions if q.category == cat)
        assert yes["yes"] == yes["no"] == 9


def read_all(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_deterministic_under_seed(tmp_path, shapes_dir):
    generate_shapes(tmp_path / "a", n_train=80, n_test=21, seed=0)
    assert read_all(tmp_path / "a") == read_all(shapes_dir)
    generate_shapes(tmp_path / "b", n_train=5, n_test=21, seed=0)  # test split independent of n_train
    b = read_all(tmp_path / "b")
    for name in ("test_questions.jsonl", "test_answers.jsonl", "images/test_00020.png"):
        assert b[name] == read_all(shapes_dir)[name]
    generate_shapes(tmp_path / "c", n_train=5, n_test=21, seed=1)
    assert read_all(tmp_path / "c")["test_questions.jsonl"] != b["test_questions.jsonl"]


def test_the_relational_family_leaves_the_other_records_as_they_were(tmp_path, shapes_dir):
    """relational=False writes what the generator wrote before the family existed (the SHA-256 of
    those files, seed 0, 80 train / 21 test images); relational=True adds its records after them."""
    import hashlib
    generate_shapes(tmp_path / "plain", n_train=80, n_test=21, seed=0, relational=False)
    plain, full = read_all(tmp_path / "plain"), read_all(shapes_dir)
    digest = {name: hashlib.sha256(plain[name]).hexdigest() for name in
              ("test_questions.jsonl", "test_answers.jsonl", "instruct.json")}
    assert digest == {"test_questions.jsonl": "d1522b2f4beaa03260f0614f807e057be23a7a4ffc3bb58ed5a3b65607c064a8",
                      "test_answers.jsonl": "938256a329a1c375752e4ffa27c1840776d04e456fb5dd6172ed655776c2733f",
                      "instruct.json": "4f7ef897e39e9c957e75d5d8c6646158333eef3e26409b997078f739be8e82f1"}
    differ = ("meta.json", "instruct.json", "test_questions.jsonl", "test_answers.jsonl")
    assert {k: v for k, v in plain.items() if k not in differ} == {k: v for k, v in full.items() if k not in differ}
    assert [r for r in load(shapes_dir / "instruct.json") if "-relational-" not in r["id"]] == \
        load(tmp_path / "plain" / "instruct.json")
    n = len(load(tmp_path / "plain" / "test_questions.jsonl"))
    assert load(shapes_dir / "test_questions.jsonl")[:n] == load(tmp_path / "plain" / "test_questions.jsonl")


def test_relational_questions_need_a_unique_answer():
    """closest / furthest only where one object is strictly closest / furthest, and never with
    fewer than 3 objects; same counts the other objects only."""
    two = Scene((SceneObject("red", "circle", "small", 0, 16, 16),
                 SceneObject("red", "square", "large", 8, 80, 80)), 96)
    rng = np.random.default_rng(0)
    assert make_question(two, "closest", rng) is None and make_question(two, "furthest", rng) is None
    tie = Scene((SceneObject("red", "circle", "small", 1, 48, 16), SceneObject("blue", "square", "large", 3, 16, 48),
                 SceneObject("green", "triangle", "small", 4, 48, 48),
                 SceneObject("red", "triangle", "small", 5, 80, 48)), 96)
    for _ in range(50):  # from the centre object all three others are 1 cell away: never asked about
        spec = make_question(tie, "closest", rng)
        assert spec is not None and (spec.color, spec.shape) != ("green", "triangle")
        assert scene_answer(tie, spec) == reference_answer(objects_of(tie), question_text(spec))
    same = {(s.color, s.shape, s.count_by): scene_answer(tie, s) for s in (make_question(tie, "same", rng)
                                                                           for _ in range(200))}
    assert same[("red", "circle", "color")] == "1" and same[("green", "triangle", "shape")] == "1"
    assert same[("blue", "square", "shape")] == "0"

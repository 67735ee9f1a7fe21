"""The shapes data set on disk: `generate_shapes` writes images, LLaVA-format `align.json`
(captions) and `instruct.json` (single-turn questions plus some short multi-turn chats), a VQA-format test
split (`test_questions.jsonl`, `test_answers.jsonl`), `scenes.jsonl` (ground-truth objects) and
`meta.json` (written last). Each image's scene, noise and questions come from its own generator
seeded by (seed, split, index): output is deterministic and the test split does not depend on
n_train. The scenes and questions themselves live in `vitune.data.builtin.shapes_scene`.

`relational=True` (the default) adds the relational family (closest / furthest / same, drawn from
a fourth generator of each image): RELATIONAL_SINGLES_PER_IMAGE training questions per image,
after the image's other records, and RELATIONAL_TEST_PER_IMAGE test questions per image, after
every other test question. The records of `relational=False` are unchanged by it, ids included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitune.data.builtin.shapes_scene import (
    CATEGORIES,
    COLOR_NAMES,
    POSITIONS,
    RELATIONAL,
    SHAPES,
    SIZES,
    Category,
    Scene,
    caption,
    make_question,
    make_scene,
    question_text,
    render_scene,
    scene_answer,
)
from vitune.files import atomic_write_json, atomic_write_jsonl

DESCRIBE = "Describe the image."
TEST_QUESTIONS_PER_IMAGE = 6
SINGLES_PER_IMAGE = 3
CHAT_FRACTION = 0.25
RELATIONAL_SINGLES_PER_IMAGE = 2
RELATIONAL_TEST_PER_IMAGE = 2
_SPLIT_IDS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class ShapesSummary:
    out_dir: Path
    n_train: int
    n_test: int
    n_align: int
    n_instruct: int
    n_test_questions: int
    align_path: Path
    instruct_path: Path
    test_questions_path: Path
    test_answers_path: Path
    scenes_path: Path
    meta_path: Path


def _fresh_qa(scene: Scene, category: Category, rng: np.random.Generator, seen: set[str],
              want_yes: bool | None = None) -> tuple[str, str, Category] | None:
    """A (question, answer, category) whose text is not in `seen` (added to it), or None."""
    for _ in range(20):
        spec = make_question(scene, category, rng, want_yes)
        if spec is None:  # the scene has no question of this category
            return None
        text = question_text(spec)
        if text not in seen:
            seen.add(text)
            return text, scene_answer(scene, spec), category
    return None


def make_conversation(scene: Scene, rng: np.random.Generator, seen: set[str]) -> list[tuple[str, str]]:
    """2-3 QA turns of distinct categories; half of the time 'Describe the image.' closes it."""
    k = int(rng.integers(2, 4))
    cats = [CATEGORIES[int(i)] for i in rng.choice(len(CATEGORIES), size=k, replace=False)]
    turns = [qa[:2] for c in cats if (qa := _fresh_qa(scene, c, rng, seen)) is not None]
    if rng.random() < 0.5:
        seen.add(DESCRIBE)
        turns.append((DESCRIBE, caption(scene)))
    return turns


# ---------------------------------------------------------------- writing the data set

def _image_rngs(seed: int, split: str, index: int) -> list[np.random.Generator]:
    """Independent (scene, noise, text, relational text) generators for one image (spawned children
    do not depend on how many are spawned: the first three are those of earlier versions)."""
    seq = np.random.SeedSequence([seed, _SPLIT_IDS[split], index])
    return [np.random.default_rng(s) for s in seq.spawn(4)]


def _llava_record(rid: str, image: str, turns: list[tuple[str, str]]) -> dict:
    conversations = []
    for i, (q, a) in enumerate(turns):
        conversations.append({"from": "human", "value": f"<image>\n{q}" if i == 0 else q})
        conversations.append({"from": "gpt", "value": a})
    return {"id": rid, "image": image, "conversations": conversations}


def _train_records(scene: Scene, name: str, image: str, rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """The caption record and the instruction records: SINGLES_PER_IMAGE single-turn questions of
    distinct categories, and for CHAT_FRACTION of the images a short multi-turn chat.

    Mostly single-turn on purpose: in a chat, one question's wording gives away another's answer
    ("What shape is the orange object ...?" then "Is there an orange square?"), and a small model
    learns to copy that instead of looking at the image.
    """
    align = {"id": f"shapes-{name}-caption", "image": image,
             "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene)}]}
    seen: set[str] = set()
    cats = [CATEGORIES[int(i)] for i in rng.choice(len(CATEGORIES), size=SINGLES_PER_IMAGE, replace=False)]
    instruct = [_llava_record(f"shapes-{name}-single-{k}", image, [qa[:2]])
                for k, c in enumerate(cats) if (qa := _fresh_qa(scene, c, rng, seen)) is not None]
    if rng.random() < CHAT_FRACTION:
        instruct.append(_llava_record(f"shapes-{name}-chat", image, make_conversation(scene, rng, seen)))
    return align, instruct


def _test_questions(scene: Scene, index: int, rng: np.random.Generator,
                    yes_counts: dict[str, int]) -> list[tuple[str, str, Category]]:
    """Six questions; categories rotate so every 7 images cover each category 6 times, and
    yes/no answers alternate per category so the test split is balanced exactly."""
    seen: set[str] = set()
    out = []
    for k in range(TEST_QUESTIONS_PER_IMAGE):
        cat = CATEGORIES[(index * TEST_QUESTIONS_PER_IMAGE + k) % len(CATEGORIES)]
        qa = _fresh_qa(scene, cat, rng, seen, want_yes=yes_counts.get(cat, 0) % 2 == 0)
        if qa is not None:
            yes_counts[cat] = yes_counts.get(cat, 0) + 1
            out.append(qa)
    return out


def _relational_qa(scene: Scene, rng: np.random.Generator, n: int, first: int) -> list[tuple[str, str, Category]]:
    """Up to `n` questions of distinct relational categories, tried from RELATIONAL[first] on in a
    rotation (a category the scene has no question of is passed over)."""
    seen: set[str] = set()
    out: list[tuple[str, str, Category]] = []
    for k in range(len(RELATIONAL)):
        if len(out) == n:
            break
        if (qa := _fresh_qa(scene, RELATIONAL[(first + k) % len(RELATIONAL)], rng, seen)) is not None:
            out.append(qa)
    return out


def _make_image(out: Path, split: str, index: int, seed: int,
                image_size: int) -> tuple[Scene, str, np.random.Generator, np.random.Generator]:
    scene_rng, noise_rng, text_rng, relational_rng = _image_rngs(seed, split, index)
    scene = make_scene(scene_rng, image_size)
    image = f"images/{split}_{index:05d}.png"
    render_scene(scene, noise_rng).save(out / image, compress_level=1)
    return scene, image, text_rng, relational_rng


def _add_question(questions: list[dict], answers: list[dict], image: str, qa: tuple[str, str, Category]) -> None:
    text, answer, category = qa
    qid = len(questions)
    questions.append({"question_id": qid, "image": image, "text": text, "category": category})
    answers.append({"question_id": qid, "answer": answer})


def _scene_record(split: str, image: str, scene: Scene) -> dict:
    return {"split": split, "image": image, "objects": [dataclasses.asdict(o) for o in scene.objects]}


def generate_shapes(out_dir: str | Path, n_train: int = 4000, n_test: int = 500, seed: int = 0,
                    image_size: int = 96, relational: bool = True) -> ShapesSummary:
    """Write the shapes data set to `out_dir` (image paths in the JSON files are relative to it)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    align, instruct, scenes, questions, answers = [], [], [], [], []
    for i in range(n_train):
        scene, image, rng, rel_rng = _make_image(out, "train", i, seed, image_size)
        a, recs = _train_records(scene, f"train-{i:05d}", image, rng)
        align.append(a)
        instruct.extend(recs)
        if relational:
            instruct.extend(_llava_record(f"shapes-train-{i:05d}-relational-{k}", image, [qa[:2]]) for k, qa in
                            enumerate(_relational_qa(scene, rel_rng, RELATIONAL_SINGLES_PER_IMAGE, i)))
        scenes.append(_scene_record("train", image, scene))
    yes_counts: dict[str, int] = {}
    later: list[tuple[str, tuple[str, str, Category]]] = []  # the relational test questions, asked last
    for i in range(n_test):
        scene, image, rng, rel_rng = _make_image(out, "test", i, seed, image_size)
        for qa in _test_questions(scene, i, rng, yes_counts):
            _add_question(questions, answers, image, qa)
        if relational:
            later += [(image, qa) for qa in _relational_qa(scene, rel_rng, RELATIONAL_TEST_PER_IMAGE,
                                                           i * RELATIONAL_TEST_PER_IMAGE)]
        scenes.append(_scene_record("test", image, scene))
    for image, qa in later:
        _add_question(questions, answers, image, qa)
    summary = ShapesSummary(
        out, n_train, n_test, len(align), len(instruct), len(questions), out / "align.json",
        out / "instruct.json", out / "test_questions.jsonl", out / "test_answers.jsonl",
        out / "scenes.jsonl", out / "meta.json")
    atomic_write_json(summary.align_path, align)
    atomic_write_json(summary.instruct_path, instruct)
    atomic_write_jsonl(summary.test_questions_path, questions)
    atomic_write_jsonl(summary.test_answers_path, answers)
    atomic_write_jsonl(summary.scenes_path, scenes)
    atomic_write_json(summary.meta_path, {  # written last: its presence marks a complete set
        "generator": "vitune.data.builtin.shapes", "version": 2, "seed": seed, "image_size": image_size,
        "n_train": n_train, "n_test": n_test, "n_align": len(align), "n_instruct": len(instruct),
        "n_test_questions": len(questions), "categories": list(CATEGORIES) + list(RELATIONAL) * relational,
        "relational": relational,
        "colors": list(COLOR_NAMES), "shapes": list(SHAPES), "sizes": list(SIZES),
        "positions": list(POSITIONS)})
    return summary

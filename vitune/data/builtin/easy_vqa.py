"""easy-VQA converter: the `easy_vqa` package's images and questions → vitune's files.

`convert_easy_vqa` copies the images it uses into `out_dir/images/` and writes `instruct.json`
(LLaVA format, one single-turn record per training question), `captions.json` (for an `align`
stage: "A red circle." for each training image whose own questions answer both its colour and
its shape directly; the others get none), the VQA-format test split
(`test_questions.jsonl`, `test_answers.jsonl`, category from the answer: shape / color / yes/no)
and `meta.json` (written last). Needs `pip install easy-vqa==1.0`.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from vitune.files import DataError, atomic_write_json, atomic_write_jsonl

# Every easy-VQA answer, by category (checked against `get_answers()` at conversion time).
SHAPE_ANSWERS = ("circle", "rectangle", "triangle")
COLOR_ANSWERS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")
YES_NO_ANSWERS = ("yes", "no")
CATEGORIES = ("shape", "color", "yes/no")


@dataclass(frozen=True)
class EasyVQASummary:
    out_dir: Path
    n_train_images: int
    n_test_images: int
    n_instruct: int
    n_test_questions: int
    instruct_path: Path
    test_questions_path: Path
    test_answers_path: Path
    meta_path: Path
    captions_path: Path
    n_captions: int


@dataclass(frozen=True)
class _Split:
    """One split as selected: image id → source path, and (text, answer, image id) questions."""

    images: dict[int, str]
    questions: list[tuple[str, str, int]]


def _import_easy_vqa() -> ModuleType:
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("the easy-VQA data set needs its package: pip install easy-vqa==1.0") from None
    return easy_vqa


def answer_categories(answers: list[str]) -> dict[str, str]:
    """Map each answer to "shape", "color" or "yes/no"; an answer in none of the lists is an error."""
    table = {a: "shape" for a in SHAPE_ANSWERS} | {a: "color" for a in COLOR_ANSWERS}
    table |= {a: "yes/no" for a in YES_NO_ANSWERS}
    unknown = sorted(set(answers) - set(table))
    if unknown:
        raise DataError(f"easy_vqa answers with no known category: {unknown}; update vitune.data.builtin.easy_vqa")
    return {a: table[a] for a in answers}


def _select(paths: dict[int, str], questions: tuple[list, list, list], limit: int | None,
            rng: random.Random) -> _Split:
    """A seeded random subset of `limit` images (all of them if None) and all their questions."""
    ids = sorted(paths)
    if limit is not None and limit < len(ids):
        ids = sorted(rng.sample(ids, limit))
    texts, answers, image_ids = questions
    missing = {int(i) for i in image_ids} - set(paths)
    if missing:
        raise DataError(f"easy_vqa: questions refer to images with no file: {sorted(missing)[:5]}")
    keep = set(ids)
    rows = [(t, a, int(i)) for t, a, i in zip(texts, answers, image_ids, strict=True) if int(i) in keep]
    return _Split({i: paths[i] for i in ids}, rows)


def _copy_images(split: _Split, name: str, out: Path) -> dict[int, str]:
    """Copy the split's images to out/images/{name}_{id:05d}.png; return id → relative path."""
    rel = {}
    for image_id, src in split.images.items():
        rel[image_id] = f"images/{name}_{image_id:05d}.png"
        shutil.copyfile(src, out / rel[image_id])
    return rel


def _instruct_records(split: _Split, rel: dict[int, str]) -> list[dict]:
    records, per_image = [], {}
    for text, answer, image_id in split.questions:
        k = per_image[image_id] = per_image.get(image_id, -1) + 1
        records.append({
            "id": f"easyvqa-train-{image_id:05d}-{k}", "image": rel[image_id],
            "conversations": [{"from": "human", "value": f"<image>\n{text}"},
                              {"from": "gpt", "value": answer}]})
    return records


def _caption_records(split: _Split, rel: dict[int, str]) -> list[dict]:
    """"A {color} {shape}." per image whose colour and shape are answers to its own questions."""
    known: dict[int, dict[str, str]] = {}
    for _, answer, image_id in split.questions:
        kind = "shape" if answer in SHAPE_ANSWERS else "color" if answer in COLOR_ANSWERS else None
        if kind:
            known.setdefault(image_id, {})[kind] = answer
    return [{"id": f"easyvqa-caption-{i:05d}", "image": rel[i],
             "conversations": [{"from": "human", "value": "<image>"},
                               {"from": "gpt", "value": f"A {k['color']} {k['shape']}."}]}
            for i, k in sorted(known.items()) if len(k) == 2]


def _test_rows(split: _Split, rel: dict[int, str], categories: dict[str, str]) -> tuple[list, list]:
    questions, answers = [], []
    for qid, (text, answer, image_id) in enumerate(split.questions):
        questions.append({"question_id": qid, "image": rel[image_id], "text": text,
                          "category": categories[answer]})
        answers.append({"question_id": qid, "answer": answer})
    return questions, answers


def convert_easy_vqa(out_dir: str | Path, max_train: int | None = None, max_test: int | None = None,
                     seed: int = 0) -> EasyVQASummary:
    """Write easy-VQA in vitune's formats; `max_train`/`max_test` limit the number of *images*."""
    ev = _import_easy_vqa()
    categories = answer_categories(ev.get_answers())
    train = _select(ev.get_train_image_paths(), ev.get_train_questions(), max_train, random.Random(f"{seed}-train"))
    test = _select(ev.get_test_image_paths(), ev.get_test_questions(), max_test, random.Random(f"{seed}-test"))
    for _, answer, _ in train.questions + test.questions:
        if answer not in categories:
            raise DataError(f"easy_vqa: answer {answer!r} is not in get_answers()")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train_rel = _copy_images(train, "train", out)
    instruct, captions = _instruct_records(train, train_rel), _caption_records(train, train_rel)
    questions, answers = _test_rows(test, _copy_images(test, "test", out), categories)
    summary = EasyVQASummary(out, len(train.images), len(test.images), len(instruct), len(questions),
                             out / "instruct.json", out / "test_questions.jsonl",
                             out / "test_answers.jsonl", out / "meta.json", out / "captions.json", len(captions))
    atomic_write_json(summary.instruct_path, instruct)
    atomic_write_json(summary.captions_path, captions)
    atomic_write_jsonl(summary.test_questions_path, questions)
    atomic_write_jsonl(summary.test_answers_path, answers)
    atomic_write_json(summary.meta_path, {  # written last: its presence marks a complete set
        "generator": "vitune.data.builtin.easy_vqa", "source": "easy-vqa==1.0", "seed": seed,
        "max_train": max_train, "max_test": max_test, "n_train_images": summary.n_train_images,
        "n_test_images": summary.n_test_images, "n_instruct": len(instruct), "n_captions": len(captions),
        "n_test_questions": len(questions), "categories": list(CATEGORIES), "answers": categories})
    return summary

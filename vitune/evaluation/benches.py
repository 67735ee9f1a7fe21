"""The built-in benchmarks `vitune eval --bench NAME` runs: an explicit registry, `BENCHES`.

Each bench is fixed: its task, its prompt template (how each question is asked; "{question}" is
the question text as the data set holds it, which is how vitune's built-in data trains) and the
parameters of the data it generates. The data are written once into a cache folder named by the
bench and its parameters (`$VITUNE_CACHE/bench/NAME-k=v-...`, else `~/.cache/vitune/bench/...`),
atomically, and reused while present:
- `shapes`: the shapes test split (`generate_shapes`, n_test=500 images, seed 0: 3,000 questions
  in 7 categories, then the relational family's questions in 3 more: closest, furthest, same; the
  first 3,000 are those of the bench before the family was added);
- `shapes-pope`: POPE existence probes over the same 500 test scenes, each of the three samplings
  (random, popular, adversarial; up to 6 probes per image, half yes, half no; seed 0): 7,986 yes/no
  questions, the sampling as their category;
- `shapes-choice` (task `choice`): the same 3,000 questions as multiple choice (`choice.
  make_choice_questions`: the answer and up to 3 other answers of its category, in a seeded order,
  as options "A. ..." on their own lines, then "Answer with the option's letter ..."); the answer
  key is the letter;
- `easy-vqa`: the packaged easy-VQA test split, every question (9,673);
- `shapes-retrieval` (task `retrieval`): the same 500 test images, each with 2 captions from its
  scene (`caption`: the 3x3 grid cell by cell, as training captions are written; `object_caption`:
  its objects as a sentence), 1,000 captions in `captions.jsonl`, one {"image": path relative to
  the bench folder, "caption": text} per line, an image's captions on adjacent lines.
- `shapes-captions` (task `caption`): the same captions file, the references of each image's one
  caption, asked with the bench's prompt, "Describe the image." (how the shapes data train it).
`prepare_bench(name, max_questions=N)` keeps the first N questions (file order; a caption bench:
the first N images), recorded; a retrieval bench refuses it (Recall@K depends on the gallery size: a subset is another benchmark).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitune.files import (
    DataError,
    atomic_dir,
    atomic_write_json,
    atomic_write_jsonl,
    read_json_records,
)

BENCH_FORMAT = "vitune-bench"
BENCH_VERSION = 1  # bump when a bench's generated data change for the same parameters
QUESTIONS, ANSWERS, CAPTIONS = "questions.jsonl", "answers.jsonl", "captions.jsonl"


@dataclass(frozen=True)
class Bench:
    name: str
    task: str  # a key of runner.TASKS, or "retrieval" (runner.eval_retrieval)
    prompt: str  # the template each question is asked through (caption: the instruction asked per image)
    description: str
    params: dict[str, Any]  # the data's parameters (part of the cache folder's name)
    build: Callable[[Path, dict[str, Any]], None] = field(repr=False)  # writes QUESTIONS, ANSWERS (retrieval:
    # CAPTIONS), images into a folder


@dataclass(frozen=True)
class PreparedBench:
    name: str
    task: str
    prompt: str
    description: str
    params: dict[str, Any]  # the bench's, plus max_questions
    folder: Path
    questions: Path  # retrieval: the captions file
    answers: Path | None  # retrieval: None
    image_root: Path

    def record(self) -> dict[str, Any]:
        """What results.json says about the bench."""
        return {"name": self.name, "task": self.task, "prompt": self.prompt, "description": self.description,
                "params": self.params, "folder": str(self.folder)}


def _build_shapes(folder: Path, params: dict[str, Any]) -> None:
    from vitune.data.builtin.shapes import generate_shapes
    s = generate_shapes(folder, n_train=0, n_test=params["n_test"], seed=params["seed"],
                        relational=params.get("relational", False))
    os.replace(s.test_questions_path, folder / QUESTIONS)
    os.replace(s.test_answers_path, folder / ANSWERS)


def _build_shapes_choice(folder: Path, params: dict[str, Any]) -> None:
    from vitune.evaluation.choice import make_choice_questions
    _build_shapes(folder, params)
    answers = {r["question_id"]: r["answer"] for r in read_json_records(folder / ANSWERS)}
    questions, keys = make_choice_questions(read_json_records(folder / QUESTIONS), answers, params["n_options"],
                                            params["choice_seed"])
    atomic_write_jsonl(folder / QUESTIONS, questions)
    atomic_write_jsonl(folder / ANSWERS, keys)


def _build_shapes_pope(folder: Path, params: dict[str, Any]) -> None:
    from vitune.data.builtin.shapes import generate_shapes
    from vitune.evaluation.pope import SAMPLERS, make_probes
    s = generate_shapes(folder, n_train=0, n_test=params["n_test"], seed=params["seed"])
    scenes = [r for r in read_json_records(s.scenes_path) if r["split"] == "test"]
    questions, answers = [], []
    for sampling in SAMPLERS:
        probes = make_probes(scenes, params["n_per_image"], sampling, params["probe_seed"], first_id=len(questions))
        questions += probes.questions
        answers += probes.answers
    atomic_write_jsonl(folder / QUESTIONS, questions)
    atomic_write_jsonl(folder / ANSWERS, answers)
    s.test_questions_path.unlink()
    s.test_answers_path.unlink()


def _build_shapes_retrieval(folder: Path, params: dict[str, Any]) -> None:
    from vitune.data.builtin.shapes import generate_shapes
    from vitune.data.builtin.shapes_scene import (
        Scene,
        SceneObject,
        caption,
        object_caption,
    )
    s = generate_shapes(folder, n_train=0, n_test=params["n_test"], seed=params["seed"])
    rows = []
    for r in read_json_records(s.scenes_path):
        if r["split"] == "test":
            scene = Scene(tuple(SceneObject(**o) for o in r["objects"]), 0)
            rows += [{"image": r["image"], "caption": caption(scene)}, {"image": r["image"], "caption": object_caption(scene)}]
    atomic_write_jsonl(folder / CAPTIONS, rows)
    s.test_questions_path.unlink()
    s.test_answers_path.unlink()


def _build_easy_vqa(folder: Path, params: dict[str, Any]) -> None:
    from vitune.data.builtin.easy_vqa import convert_easy_vqa
    s = convert_easy_vqa(folder, max_train=1, max_test=params["max_test"], seed=params["seed"])
    os.replace(s.test_questions_path, folder / QUESTIONS)
    os.replace(s.test_answers_path, folder / ANSWERS)


BENCHES: dict[str, Bench] = {b.name: b for b in (
    Bench("shapes", "vqa", "{question}", "the shapes test split: 6 questions per image in 7 categories, then up to "
          "2 relational ones per image (closest, furthest, same)", {"n_test": 500, "seed": 0, "relational": True},
          _build_shapes),
    Bench("shapes-pope", "pope", "{question}", "POPE object-existence probes on the shapes test scenes: "
          "random, popular and adversarial sampling, half yes, half no",
          {"n_test": 500, "seed": 0, "n_per_image": 6, "probe_seed": 0}, _build_shapes_pope),
    Bench("shapes-choice", "choice", "{question}", "the shapes test questions as multiple choice: the answer and "
          "up to 3 other answers of the question's category as options A-D, answered with a letter",
          {"n_test": 500, "seed": 0, "n_options": 4, "choice_seed": 0}, _build_shapes_choice),
    Bench("shapes-captions", "caption", "Describe the image.", "captioning the shapes test images, scored against 2 "
          "references each (the grid caption and an object sentence): BLEU-1..4, METEOR, ROUGE-L, CIDEr",
          {"n_test": 500, "seed": 0}, _build_shapes_retrieval),
    Bench("easy-vqa", "vqa", "{question}", "easy-VQA test split (the packaged easy-vqa 1.0): shape, color, yes/no",
          {"max_test": None, "seed": 0}, _build_easy_vqa),
    Bench("shapes-retrieval", "retrieval", "{question}", "image-text retrieval on the shapes test images: 2 captions "
          "per image (the grid caption and an object sentence), Recall@1/5/10 both ways", {"n_test": 500, "seed": 0},
          _build_shapes_retrieval),
)}


def cache_root() -> Path:
    """`$VITUNE_CACHE/bench`, else `~/.cache/vitune/bench`."""
    return Path(os.environ.get("VITUNE_CACHE") or Path.home() / ".cache" / "vitune") / "bench"


def _folder_name(bench: Bench) -> str:
    parts = [bench.name, *(f"{k}={'all' if v is None else v}" for k, v in sorted(bench.params.items()))]
    return "-".join(parts) + f"-v{BENCH_VERSION}"


def _first(src: Path, dst: Path, n: int) -> None:
    if not dst.exists():
        atomic_write_jsonl(dst, read_json_records(src)[:n])


def prepare_bench(name: str, max_questions: int | None = None, log: Callable[[str], None] | None = None) -> PreparedBench:
    """The bench's data, generated into its cache folder unless there already (see the module
    docstring); `max_questions` keeps the first N of its questions (and their answers)."""
    if name not in BENCHES:
        raise DataError(f"no built-in bench named {name!r}; the benches are {sorted(BENCHES)}")
    bench = BENCHES[name]
    folder = cache_root() / _folder_name(bench)
    marker = folder / "bench.json"
    if not marker.is_file():
        if log:
            log(f"preparing bench {name} in {folder} (once; reused afterwards)")
        with atomic_dir(folder) as tmp:
            bench.build(tmp, dict(bench.params))
            atomic_write_json(tmp / "bench.json", {"format": BENCH_FORMAT, "version": BENCH_VERSION, "name": name,
                                                   "task": bench.task, "params": bench.params})
    meta = json.loads(marker.read_text(encoding="utf-8"))
    if meta.get("name") != name or meta.get("params") != bench.params:
        raise DataError(f"{marker}: holds bench {meta.get('name')!r} {meta.get('params')}, not {name!r} "
                        f"{bench.params}; delete {folder} to regenerate it")
    params = {**bench.params, "max_questions": max_questions}
    if bench.task == "caption":
        return PreparedBench(name, bench.task, bench.prompt, bench.description, params, folder, folder / CAPTIONS,
                             None, folder)
    if bench.task == "retrieval":
        if max_questions is not None:
            raise DataError(f"bench {name} ranks all its images against all its captions: --max-questions does not "
                            "apply (Recall@K depends on the gallery size, so a subset would be another benchmark)")
        return PreparedBench(name, bench.task, bench.prompt, bench.description, params, folder, folder / CAPTIONS,
                             None, folder)
    questions, answers = folder / QUESTIONS, folder / ANSWERS
    if max_questions is not None:
        rows = read_json_records(questions)
        if max_questions < len(rows):
            keep = {r["question_id"] for r in rows[:max_questions]}
            q, a = folder / f"questions.first-{max_questions}.jsonl", folder / f"answers.first-{max_questions}.jsonl"
            _first(questions, q, max_questions)
            if not a.exists():
                atomic_write_jsonl(a, [r for r in read_json_records(answers) if r["question_id"] in keep])
            questions, answers = q, a
    return PreparedBench(name, bench.task, bench.prompt, bench.description, params, folder, questions, answers, folder)

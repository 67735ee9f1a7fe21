"""POPE-style object hallucination probes from shapes scene metadata, and their metrics.

An object is a (colour, shape) pair, as the shapes generator records it per scene object (a pair
is unique within a scene); the vocabulary is every pair present in some scene of the set.
`make_probes` asks "Is there a red circle in the image?" about each image: k present objects
(answer "yes", drawn uniformly) and k absent ones ("no"), k = min(n_per_image // 2, present,
absent), so every image, and the set, is balanced exactly. Absent objects are chosen by `SAMPLERS`:
- "random": uniformly among the absent objects;
- "popular": the absent objects present in the most scenes of the set;
- "adversarial": the absent objects that co-occur most with the image's present ones (the sum,
  over its present objects, of the scenes holding both).
Ties in popular / adversarial go to the earlier object in (colour, shape) alphabetical order. An
image's draws come from numpy default_rng([seed, image index]): deterministic for a seed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from vitune.evaluation.answers import vqa_normalize

QuestionId = int | str
Object = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class _Stats:
    frequency: Counter  # object -> scenes holding it
    together: Counter  # frozenset({a, b}) -> scenes holding both


Sampler = Callable[[list[Object], list[Object], int, np.random.Generator, _Stats], list[Object]]

def _objects(scene: Mapping) -> list[Object]:
    return sorted({(o["color"], o["shape"]) for o in scene["objects"]})


def _stats(scenes: Sequence[list[Object]]) -> _Stats:
    return _Stats(Counter(o for s in scenes for o in s),
                  Counter(frozenset(p) for s in scenes for p in combinations(s, 2)))


def _random(present, absent, k, rng, stats) -> list[Object]:
    return [absent[int(i)] for i in rng.choice(len(absent), size=k, replace=False)]


def _popular(present, absent, k, rng, stats) -> list[Object]:
    return sorted(absent, key=lambda o: -stats.frequency[o])[:k]  # stable: ties stay alphabetical


def _adversarial(present, absent, k, rng, stats) -> list[Object]:
    return sorted(absent, key=lambda o: -sum(stats.together[frozenset((o, p))] for p in present))[:k]


SAMPLERS: dict[str, Sampler] = {"random": _random, "popular": _popular, "adversarial": _adversarial}


@dataclass(frozen=True)
class Probes:
    questions: tuple[dict, ...]  # {"question_id", "image", "text", "category": the sampler name}
    answers: tuple[dict, ...]  # {"question_id", "answer": "yes" | "no"}


def probe_text(obj: Object) -> str:
    colour, shape = obj
    return f"Is there {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} in the image?"


def make_probes(scenes: Sequence[Mapping], n_per_image: int = 6, sampling: str = "random", seed: int = 0,
                first_id: int = 0) -> Probes:
    """Yes/no existence probes for each scene record ({"image", "objects": [{"color", "shape", ...}]},
    as in scenes.jsonl), in vitune's questions/answers format; rules in the module docstring.
    Question ids count up from `first_id`; an image's probes are in a seeded random order."""
    if sampling not in SAMPLERS:
        raise ValueError(f"sampling must be one of {list(SAMPLERS)}, got {sampling!r}")
    if not isinstance(n_per_image, int) or n_per_image < 2 or n_per_image % 2:
        raise ValueError(f"n_per_image must be an even integer >= 2, got {n_per_image!r}")
    per_scene = [_objects(s) for s in scenes]
    stats = _stats(per_scene)
    vocabulary = sorted(stats.frequency)
    questions, answers = [], []
    for index, (scene, present) in enumerate(zip(scenes, per_scene, strict=True)):
        rng = np.random.default_rng([seed, index])
        absent = [o for o in vocabulary if o not in present]
        k = min(n_per_image // 2, len(present), len(absent))
        yes = [present[int(i)] for i in rng.choice(len(present), size=k, replace=False)]
        no = SAMPLERS[sampling](present, absent, k, rng, stats)
        probes = [(o, "yes") for o in yes] + [(o, "no") for o in no]
        for j in rng.permutation(len(probes)):
            obj, answer = probes[int(j)]
            qid = first_id + len(questions)
            questions.append({"question_id": qid, "image": scene["image"], "text": probe_text(obj),
                              "category": sampling})
            answers.append({"question_id": qid, "answer": answer})
    return Probes(tuple(questions), tuple(answers))


@dataclass(frozen=True)
class PopeResult:
    accuracy: float
    precision: float  # tp / (tp + fp); 0 when nothing is answered "yes"
    recall: float  # tp / (tp + fn); an answer other than "yes" to a "yes" probe is a miss
    f1: float  # 0 when precision + recall is 0
    yes_ratio: float  # answers "yes" / n
    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    unparseable: tuple[QuestionId, ...] = ()  # answers neither "yes" nor "no" (counted wrong)
    missing: tuple[QuestionId, ...] = ()  # probes without a prediction (counted wrong)


def _one(qid: QuestionId, refs: Sequence[str]) -> str:
    if len(refs) != 1:
        raise ValueError(f"pope_metrics: question {qid!r} needs one reference answer, got {list(refs)}")
    return vqa_normalize(refs[0])


def pope_metrics(predictions: Mapping[QuestionId, str],
                 answers: Mapping[QuestionId, str | Sequence[str]]) -> PopeResult:
    """Score yes/no answers (positive = "yes") after `vqa_normalize`: an answer counts as yes or
    no only when it normalises to exactly "yes" or "no" ("Yes." does, "yes, there is" does not).
    A reference is "yes" or "no", or a one-item list of it (as `read_answers` gives)."""
    if not answers:
        raise ValueError("pope_metrics: no reference answers to score against")
    truth = {q: vqa_normalize(a) if isinstance(a, str) else _one(q, a) for q, a in answers.items()}
    if bad := {q: a for q, a in truth.items() if a not in ("yes", "no")}:
        raise ValueError(f"pope_metrics: reference answers must be yes or no: {bad}")
    tp = fp = tn = fn = said_yes = 0
    unparseable, missing = [], []
    for qid, want in truth.items():
        got = vqa_normalize(predictions[qid]) if qid in predictions else None
        if got is None:
            missing.append(qid)
        elif got not in ("yes", "no"):
            unparseable.append(qid)
        said_yes += got == "yes"
        tp += want == "yes" and got == "yes"
        fn += want == "yes" and got != "yes"
        fp += want == "no" and got == "yes"
        tn += want == "no" and got == "no"
    n = len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PopeResult((tp + tn) / n, precision, recall, f1, said_yes / n, n, tp, fp, tn, fn,
                      tuple(unparseable), tuple(missing))

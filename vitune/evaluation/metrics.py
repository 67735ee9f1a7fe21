"""Metrics: VQA exact-match accuracy on normalised answers, overall and per category.

`normalize_answer` is the one place answers are compared: lower-case, surrounding whitespace and
trailing punctuation stripped, whitespace collapsed, articles dropped, number words → digits.
A question without a prediction counts as wrong and is reported in `VQAResult.missing`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

QuestionId = int | str

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBERS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_TRAILING_PUNCT = re.compile(r"[\s.,!?;:]+$")
UNCATEGORISED = "(none)"


def normalize_answer(s: str) -> str:
    """'  The Two Circles. ' → '2 circles'."""
    s = _TRAILING_PUNCT.sub("", s.strip().lower())
    words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


@dataclass(frozen=True)
class CategoryScore:
    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass(frozen=True)
class VQAResult:
    accuracy: float  # fraction in [0, 1] over all questions with reference answers
    n: int
    correct: int
    missing: tuple[QuestionId, ...] = ()  # questions with no prediction (counted wrong)
    per_category: dict[str, CategoryScore] = field(default_factory=dict)  # empty without categories
    n_extra: int = 0  # predictions for questions with no reference answer (ignored)

    @property
    def n_missing(self) -> int:
        return len(self.missing)


def is_correct(prediction: str, references: Sequence[str]) -> bool:
    p = normalize_answer(prediction)
    return any(p == normalize_answer(r) for r in references)


def vqa_exact_match(predictions: Mapping[QuestionId, str], answers: Mapping[QuestionId, Sequence[str] | str],
                    categories: Mapping[QuestionId, str | None] | None = None) -> VQAResult:
    """Score every question in `answers`; `categories` (question_id → category) adds a breakdown."""
    if not answers:
        raise ValueError("vqa_exact_match: no reference answers to score against")
    tally: dict[str, list[int]] = {}
    correct, missing = 0, []
    for qid, refs in answers.items():
        refs = [refs] if isinstance(refs, str) else refs
        ok = qid in predictions and is_correct(predictions[qid], refs)
        if qid not in predictions:
            missing.append(qid)
        correct += ok
        if categories is not None:
            t = tally.setdefault(categories.get(qid) or UNCATEGORISED, [0, 0])
            t[0] += 1
            t[1] += ok
    per_category = {c: CategoryScore(n, k) for c, (n, k) in sorted(tally.items())}
    n_extra = sum(1 for qid in predictions if qid not in answers)
    return VQAResult(correct / len(answers), len(answers), correct, tuple(missing), per_category, n_extra)


def format_table(result: VQAResult) -> str:
    """A plain-text table: one row per category, then the overall row."""
    rows = [(c, s.n, 100 * s.accuracy) for c, s in result.per_category.items()]
    rows.append(("overall", result.n, 100 * result.accuracy))
    width = max(len("category"), *(len(r[0]) for r in rows))
    lines = [f"{'category':<{width}}  {'n':>6}  {'accuracy':>8}"]
    lines += [f"{c:<{width}}  {n:>6}  {acc:>7.1f}%" for c, n, acc in rows]
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    if result.n_missing:
        lines.append(f"{result.n_missing} question(s) had no prediction and count as wrong")
    return "\n".join(lines)

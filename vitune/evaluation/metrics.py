"""Metrics: VQA exact-match accuracy on normalised answers, overall and per category.

`normalize_answer` is the one place answers are compared: lower-case, surrounding whitespace and
trailing punctuation stripped, whitespace collapsed, articles dropped, number words → digits.
A question without a prediction counts as wrong and is reported in `VQAResult.missing`.

Coverage is part of every result, never implied: `missing` (questions without a prediction, wrong),
`extra` (predictions for ids that are not scored questions, ignored), `n_empty` (empty answers,
scored as given), and, from `eval_vqa`, `n_no_reference` (questions without reference answers, not
scored) and `n_unused_answers` (reference answers for ids that are not questions, not scored).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence

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
    extra: tuple[QuestionId, ...] = ()  # their ids (eval_vqa: ids that are not questions at all)
    n_empty: int = 0  # scored questions whose prediction is empty ("" or blank): allowed, scored as given
    n_no_reference: int = 0  # questions (in a questions file) with no reference answer: not scored
    n_unused_answers: int = 0  # reference answers whose id is no question: not scored

    @property
    def n_missing(self) -> int:
        return len(self.missing)

    @property
    def n_answered(self) -> int:
        """Scored questions that have a prediction."""
        return self.n - self.n_missing

    def to_dict(self) -> dict[str, Any]:
        """Every field (as `dataclasses.asdict`) plus the derived counts: what `eval --out` writes."""
        out = asdict(self)
        out.update(n_missing=self.n_missing, n_answered=self.n_answered)
        return out


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
    extra = tuple(qid for qid in predictions if qid not in answers)
    n_empty = sum(1 for qid in answers if qid in predictions and not predictions[qid].strip())
    return VQAResult(correct / len(answers), len(answers), correct, tuple(missing), per_category, len(extra),
                     extra, n_empty)


def id_type_mismatch(ids: Iterable[QuestionId], known: Collection[QuestionId]) -> tuple[QuestionId, QuestionId] | None:
    """The first id not in `known` that equals one there once both are text (`"0"` vs `0`), with
    that one; None if there is none. Ids are compared exactly, so such a pair never matches."""
    as_text = {str(k): k for k in known}
    for i in ids:
        if i not in known and str(i) in as_text:
            return i, as_text[str(i)]
    return None


def _ids(ids: Sequence[QuestionId], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def format_table(result: VQAResult) -> str:
    """A plain-text table: one row per category, then the overall row."""
    rows = [(c, s.n, 100 * s.accuracy) for c, s in result.per_category.items()]
    rows.append(("overall", result.n, 100 * result.accuracy))
    width = max(len("category"), *(len(r[0]) for r in rows))
    lines = [f"{'category':<{width}}  {'n':>6}  {'accuracy':>8}"]
    lines += [f"{c:<{width}}  {n:>6}  {acc:>7.1f}%" for c, n, acc in rows]
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines += coverage_lines(result)
    return "\n".join(lines)


def coverage_lines(result: VQAResult) -> list[str]:
    """What the accuracy does and does not cover; nothing when every scored question has a
    prediction and nothing was left out."""
    lines = []
    if result.n_missing:
        lines.append(f"coverage: {result.n_answered} of {result.n} scored questions have a prediction")
        lines.append(f"{result.n_missing} question(s) had no prediction and count as wrong: {_ids(result.missing)}")
    if result.n_extra:
        lines.append(f"{result.n_extra} prediction(s) for ids that are not questions, not scored: "
                     f"{_ids(result.extra)}")
    if result.n_no_reference:
        lines.append(f"{result.n_no_reference} question(s) have no reference answer, not scored")
    if result.n_unused_answers:
        lines.append(f"{result.n_unused_answers} reference answer(s) are for ids that are not questions, not scored")
    if result.n_empty:
        lines.append(f"{result.n_empty} prediction(s) are empty (\"\") and scored as given")
    return lines

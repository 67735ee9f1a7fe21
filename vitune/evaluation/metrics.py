"""Metrics: VQA exact-match accuracy on normalised answers, overall and per category.

`normalize_answer` is the one place answers are compared: lower-case, surrounding whitespace and
trailing punctuation stripped, whitespace collapsed, articles dropped, number words → digits.
A question without a prediction counts as wrong and is reported in `VQAResult.missing`.

Coverage is part of every result, never implied: `missing` (questions without a prediction, wrong),
`extra` (predictions for ids that are not scored questions, ignored), `n_empty` (empty answers,
scored as given), and, from `eval_vqa`, `n_no_reference` (questions without reference answers, not
scored) and `n_unused_answers` (reference answers for ids that are not questions, not scored).

`vqa_exact_match` scores 0 or 1 per question with `normalize_answer`; `score_vqa` takes any
per-question scorer (`eval_vqa` uses the VQAv2 rule, `answers.vqa_accuracy`) and keeps each
question's score in `VQAResult.scores` (missing predictions: 0), which `vitune eval --compare` pairs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

from vitune.evaluation.intervals import Accuracy

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
    correct: float  # a count for 0/1 scores (an int then), else a sum of scores in [0, 1]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """The 95 % Wilson interval of the accuracy."""
        return Accuracy(self.correct, self.n).interval


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
    # each scored question's score (missing: 0.0), in answer order; not part of `to_dict`
    scores: Mapping[QuestionId, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def interval(self) -> tuple[float, float]:
        """The 95 % Wilson interval of the overall accuracy."""
        return Accuracy(self.correct, self.n).interval

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
        del out["scores"]
        out.update(n_missing=self.n_missing, n_answered=self.n_answered)
        return out


def is_correct(prediction: str, references: Sequence[str]) -> bool:
    p = normalize_answer(prediction)
    return any(p == normalize_answer(r) for r in references)


def vqa_exact_match(predictions: Mapping[QuestionId, str], answers: Mapping[QuestionId, Sequence[str] | str],
                    categories: Mapping[QuestionId, str | None] | None = None) -> VQAResult:
    """Score every question in `answers`; `categories` (question_id → category) adds a breakdown."""
    return score_vqa(predictions, answers, categories, lambda p, refs: float(is_correct(p, refs)), "vqa_exact_match")


def _total(scores: Iterable[float]) -> float:
    """The sum, as an int when every score is 0 or 1 (a count)."""
    scores = list(scores)
    total = sum(scores)
    return int(total) if all(s in (0.0, 1.0) for s in scores) else total


def score_vqa(predictions: Mapping[QuestionId, str], answers: Mapping[QuestionId, Sequence[str] | str],
              categories: Mapping[QuestionId, str | None] | None = None,
              scorer: Callable[[str, Sequence[str]], float] | None = None, name: str = "score_vqa") -> VQAResult:
    """Score every question in `answers` with `scorer(prediction, references)` in [0, 1] (default:
    the VQAv2 rule, `answers.vqa_accuracy`); a question without a prediction scores 0.
    `categories` (question_id → category) adds a breakdown."""
    if scorer is None:
        from vitune.evaluation.answers import vqa_accuracy as scorer
    if not answers:
        raise ValueError(f"{name}: no reference answers to score against")
    scores: dict[QuestionId, float] = {}
    by_category: dict[str, list[float]] = {}
    missing = []
    for qid, refs in answers.items():
        refs = [refs] if isinstance(refs, str) else refs
        if qid not in predictions:
            missing.append(qid)
        scores[qid] = float(scorer(predictions[qid], refs)) if qid in predictions else 0.0
        if categories is not None:
            by_category.setdefault(categories.get(qid) or UNCATEGORISED, []).append(scores[qid])
    per_category = {c: CategoryScore(len(v), _total(v)) for c, v in sorted(by_category.items())}
    extra = tuple(qid for qid in predictions if qid not in answers)
    n_empty = sum(1 for qid in answers if qid in predictions and not predictions[qid].strip())
    correct = _total(scores.values())
    return VQAResult(correct / len(answers), len(answers), correct, tuple(missing), per_category, len(extra),
                     extra, n_empty, scores=scores)


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


def format_table(result: VQAResult, intervals: bool = False) -> str:
    """A plain-text table: one row per category, then the overall row; `intervals` adds each
    accuracy's 95 % Wilson interval."""
    rows = [(c, s.n, 100 * s.accuracy, s.interval) for c, s in result.per_category.items()]
    rows.append(("overall", result.n, 100 * result.accuracy, result.interval))
    width = max(len("category"), *(len(r[0]) for r in rows))
    lines = [f"{'category':<{width}}  {'n':>6}  {'accuracy':>8}" + (f"  {'95 % CI':<12}" if intervals else "")]
    lines += [f"{c:<{width}}  {n:>6}  {acc:>7.1f}%" + (f"  {100 * lo:5.1f}-{100 * hi:5.1f}%" if intervals else "")
              for c, n, acc, (lo, hi) in rows]
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

"""Multiple-choice scoring: which option letter an answer names, and accuracy over questions.

`extract_letter` reads a letter out of a free-text answer by these forms, and no others:
- the whole answer is one letter, any case, inside any brackets or punctuation: "B", "b", "(B).";
- it starts with an upper-case letter followed by ".", ")", "]" or ":" and then a space or the
  end, optionally after "(" or "[": "B. a dog", "(B) a dog", "B: dog";
- an upper-case letter in brackets anywhere: "I think (B) is right", "[C]";
- an upper-case letter as a word after a cue ("answer is", "answer:", "option", "choice"; the cue
  in any case, an optional ":" or "-" and bracket between): "Answer: B", "the answer is (C)".
Lower-case letters count only in the first form, so the article in "a dog" is never "A".
Letters outside `letters` are ignored. Exactly one distinct letter must be found; none, or two
different ones ("(A) or (B)"), is unparseable (None), which `score_choices` counts as wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

QuestionId = int | str
DEFAULT_LETTERS = "ABCD"


def _patterns(letters: str) -> tuple[re.Pattern[str], ...]:
    L = "[" + re.escape(letters) + "]"
    return (
        re.compile(rf"^[\W_]*({L})[\W_]*$", re.IGNORECASE),
        re.compile(rf"^\s*[(\[]?({L})[.)\]:](?=\s|$)"),
        re.compile(rf"[(\[]({L})[)\]]"),
        re.compile(rf"(?i:answer\s*(?:is|:)|option|choice)\s*[:\-]?\s*[(\[]?({L})\b"),
    )


def extract_letter(text: str, letters: str = DEFAULT_LETTERS) -> str | None:
    """The one option letter `text` names (upper case), or None: see the module docstring."""
    if not letters or not letters.isalpha() or not letters.isupper():
        raise ValueError(f"letters must be upper-case letters, got {letters!r}")
    found = {m.group(1).upper() for p in _patterns(letters) for m in p.finditer(text)}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class ChoiceResult:
    accuracy: float  # correct / n, over every question with an answer key
    n: int
    correct: int
    unparseable: tuple[QuestionId, ...] = ()  # predictions naming no single letter (counted wrong)
    missing: tuple[QuestionId, ...] = ()  # questions without a prediction (counted wrong)
    n_extra: int = 0  # predictions for ids without an answer key (ignored)


def score_choices(predictions: Mapping[QuestionId, str], answers: Mapping[QuestionId, str],
                  letters: str = DEFAULT_LETTERS) -> ChoiceResult:
    """Accuracy of `predictions` (free text) against `answers` (the right letter per question):
    a prediction is right when `extract_letter` gives the answer's letter."""
    if not answers:
        raise ValueError("score_choices: no answer key to score against")
    bad = {q: a for q, a in answers.items() if not isinstance(a, str) or a.strip().upper() not in letters
           or len(a.strip()) != 1}
    if bad:
        raise ValueError(f"score_choices: answer keys must be one of the letters {letters!r}: {bad}")
    correct, unparseable, missing = 0, [], []
    for qid, key in answers.items():
        if qid not in predictions:
            missing.append(qid)
            continue
        got = extract_letter(predictions[qid], letters)
        if got is None:
            unparseable.append(qid)
        correct += got == key.strip().upper()
    extra = sum(1 for q in predictions if q not in answers)
    return ChoiceResult(correct / len(answers), len(answers), correct, tuple(unparseable), tuple(missing), extra)

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

Also here: `answer_letters` (the letters an answer key uses) and `make_choice_questions`, which
turns open questions with a closed answer set per category into multiple-choice ones (the
`shapes-choice` bench): the right answer and up to `n_options - 1` other answers of the same
category as options, in a seeded random order, asked with `CHOICE_INSTRUCTION`.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

QuestionId = int | str
DEFAULT_LETTERS = "ABCD"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


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


def answer_letters(keys: Mapping[QuestionId, Sequence[str]]) -> str:
    """The letters an answer key's questions are read with: A to the last letter any key uses, at
    least `DEFAULT_LETTERS`. Every key must be one letter A-Z (its first reference answer); the
    ValueError names the first that is not."""
    last = DEFAULT_LETTERS[-1]
    for qid, refs in keys.items():
        key = refs[0].strip() if refs else ""
        if len(key) != 1 or key.upper() not in string.ascii_uppercase:
            raise ValueError(f"question_id {qid!r}: a multiple-choice answer must be one option letter (A-Z), "
                             f"got {refs[0] if refs else None!r}")
        last = max(last, key.upper())
    return string.ascii_uppercase[:string.ascii_uppercase.index(last) + 1]


def choice_text(question: str, options: Sequence[str]) -> str:
    """The question, its options one per line as "A. option", then `CHOICE_INSTRUCTION`."""
    lines = [question, *(f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options)), CHOICE_INSTRUCTION]
    return "\n".join(lines)


def make_choice_questions(questions: Sequence[Mapping], answers: Mapping[QuestionId, str], n_options: int = 4,
                          seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(questions, answers) rows of multiple-choice versions of `questions` (VQA-format rows with
    "question_id", "image", "text", "category"; `answers`: question_id → its answer). A question's
    options are its answer and up to `n_options - 1` other distinct answers of its category (so a
    yes/no category has 2), in an order drawn from `random.Random(seed)`; the answer row holds the
    right letter. A category with one distinct answer cannot be asked: ValueError."""
    if not 2 <= n_options <= len(string.ascii_uppercase):
        raise ValueError(f"n_options must be in 2..26, got {n_options}")
    pools: dict[str | None, list[str]] = {}
    for q in questions:
        pool = pools.setdefault(q.get("category"), [])
        if answers[q["question_id"]] not in pool:
            pool.append(answers[q["question_id"]])
    rng = random.Random(seed)
    out_q, out_a = [], []
    for q in questions:
        answer = answers[q["question_id"]]
        others = sorted(a for a in pools[q.get("category")] if a != answer)
        if not others:
            raise ValueError(f"category {q.get('category')!r} has only one answer ({answer!r}): no options to offer")
        options = [answer, *rng.sample(others, min(n_options - 1, len(others)))]
        rng.shuffle(options)
        out_q.append({**q, "text": choice_text(q["text"], options)})
        out_a.append({"question_id": q["question_id"], "answer": string.ascii_uppercase[options.index(answer)]})
    return out_q, out_a

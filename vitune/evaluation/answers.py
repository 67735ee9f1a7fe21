"""VQA answer normalisation and accuracy as the official VQA evaluation (VQAv2's vqaEval.py) does it.

`vqa_normalize` applies the official steps, in their order, to any answer text:
1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation (`PUNCTUATION`: ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !) is removed where it
   touches a space (or everywhere, when the text holds a comma between digits, so "1,000" is
   "1000"), otherwise it becomes a space ("black-and-white" is "black and white"); then every
   period not followed by a digit is removed ("dog." is "dog", "3.5" stays: this is what the
   official pattern does, its look-behind being malformed). Apostrophes and colons are kept;
3. lower case; words split on whitespace; number words `NUMBER_WORDS` ("none", "zero" .. "ten")
   become digits; the articles a, an, the are dropped; `CONTRACTIONS` restore the apostrophe
   ("dont" is "don't").
Unlike the official script, references are normalised exactly like predictions (it runs only
step 2 on references, and only when they differ, relying on its pre-cleaned annotations).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                                "@", "`", ",", "?", "!")
NUMBER_WORDS: dict[str, str] = {"none": "0", **{w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}}
ARTICLES = frozenset({"a", "an", "the"})
# Contracted forms whose apostrophe-less spellings are not ordinary words ("its", "well", "were",
# "ill", "shed", "lets" are, so it's, we'll, we're, i'll, she'd, let's are not here).
_CONTRACTED: tuple[str, ...] = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd've", "i'm",
    "i've", "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd've", "should've", "shouldn't",
    "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd",
    "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas",
    "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd",
    "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's",
    "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've",
    "you'll", "you're", "you've",
)
FULL_AGREEMENT = 3  # an answer given by this many annotators (of the others) scores 1
OFFICIAL_REFERENCES = 10  # the annotator count the leave-one-out rule is defined for

_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")


def _misspellings(word: str) -> list[str]:
    """`word` with each non-empty set of its apostrophes left out: "couldn't've" -> "couldntve", ..."""
    parts = word.split("'")
    out = []
    for keep in itertools.product((True, False), repeat=len(parts) - 1):
        if all(keep):
            continue
        out.append(parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:])))
    return out


CONTRACTIONS: dict[str, str] = {m: c for c in _CONTRACTED for m in _misspellings(c)}


def _punctuation(text: str) -> str:
    drop_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in PUNCTUATION:
        touches_space = f"{p} " in text or f" {p}" in text
        out = out.replace(p, "" if drop_all or touches_space else " ")
    return _PERIOD.sub("", out)


def vqa_normalize(text: str) -> str:
    """The official normalisation (module docstring): ' The Two dogs! ' -> '2 dogs'."""
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """The score of one answer in [0, 1], after `vqa_normalize` on both sides.

    With exactly 10 references (the VQA protocol): the mean, over the 10 ways of leaving one
    reference out, of min(1, matches among the other 9 / 3); m matches score
    (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10, so 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.
    With any other number (>= 1): 1.0 if it matches any reference, else 0.0. Such lists are
    accepted alternatives (["2", "two"]), not annotator votes; the official script would apply the
    leave-one-out rule to them too, which scores every answer 0 against a single reference.
    """
    if isinstance(references, str) or not references:
        raise ValueError(f"vqa_accuracy: references must be a non-empty list of strings, got {references!r}")
    p = vqa_normalize(prediction)
    matches = [vqa_normalize(r) == p for r in references]
    if len(references) != OFFICIAL_REFERENCES:
        return 1.0 if any(matches) else 0.0
    m = sum(matches)
    return sum(min(1.0, (m - hit) / FULL_AGREEMENT) for hit in matches) / len(matches)

"""Caption metrics (vitune.evaluation.captions): values checkable by hand, coverage, errors, and the
METEOR process being stopped. Java tests are skipped only where there is no `java` on PATH.

One METEOR process (about 10 s to load its paraphrase table) serves the whole file: the module-scoped
`scorer` starts it in the first Java test and it loads while the tests that do not need it run."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from vitune.evaluation import captions
from vitune.evaluation.captions import (
    CaptionMetricsUnavailable,
    CaptionResult,
    CaptionScorer,
    caption_metrics,
    format_captions,
    ptb_tokenize,
)

java = pytest.mark.skipif(shutil.which("java") is None,
                          reason="no `java` on PATH: pycocoevalcap's PTB tokenizer and METEOR need Java "
                                 "(apt-get install default-jre-headless)")

# Three images, one reference each, no n-gram (1..4) shared by all three references, so that a
# prediction identical to its reference has CIDEr exactly 10 (see test_identical).
REFS = {1: ["a dog runs on the green grass"], "img-2": ["a red car parked by the road"], 3: ["two cats sleep on a sofa"]}
IDENTICAL = {k: v[0] for k, v in REFS.items()}
PARAPHRASE = {1: "a dog running on grass", "img-2": "a red car on the road", 3: "two cats on a couch"}
DISJOINT = {1: "blue sky with white clouds", "img-2": "people eating pizza at tables", 3: "snowy mountain over lake"}


@pytest.fixture(scope="module")
def scorer():
    with CaptionScorer() as s:
        yield s


# --- no Java needed --------------------------------------------------------------------------------

def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)  # import now fails
    with pytest.raises(CaptionMetricsUnavailable, match=r"pip install 'vitune\[eval\]'"):
        caption_metrics({1: "a cat"}, {1: ["a cat"]})


def test_missing_java_names_the_package(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    with pytest.raises(CaptionMetricsUnavailable, match="apt-get install default-jre-headless"):
        CaptionScorer()


@pytest.mark.parametrize("preds, refs, match", [
    ({}, {}, "no reference captions"),
    ({1: "x"}, {1: []}, "id 1 has no reference captions"),
    ({1: "x"}, {"1": ["a cat", "  "]}, "reference 1 of id '1' is empty"),
    ({1: "x"}, {1: [None]}, "reference 0 of id 1 must be a string"),
    ({1: 3}, {1: ["a cat"]}, "prediction for id 1 must be a string"),
])
def test_bad_input_fails_before_java(monkeypatch, preds, refs, match):
    monkeypatch.setattr(captions, "_require", lambda: pytest.fail("inputs are checked first"))
    with pytest.raises(ValueError, match=match):
        caption_metrics(preds, refs)


def test_format_captions():
    r = CaptionResult(0.7, 0.5, 0.3, 0.2, None, 0.55, 1.234, n=4, missing=("7",), n_extra=1, extra=(8,), n_empty=2)
    text = format_captions(r)
    assert "BLEU-1      70.0" in text and "CIDEr      123.4" in text and "METEOR         -" in text
    assert "1 id(s) had no prediction and are scored as an empty caption: '7'" in text
    assert "1 prediction(s) for ids without reference captions, not scored: 8" in text
    assert "2 prediction(s) are empty" in text
    assert r.to_dict()["n_answered"] == 3
    clean = format_captions(CaptionResult(1, 1, 1, 1, 1, 1, 10, n=3))
    assert "coverage" not in clean and "METEOR     100.0" in clean


# --- Java -----------------------------------------------------------------------------------------

@java
def test_meteor_starts_with_the_scorer(scorer):
    # Started at once (it loads while the next tests run); test_close_stops_meteor is last.
    assert scorer._meteor.meteor_p.poll() is None


@java
def test_tokenizer_is_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    caps = ["A man's dog, running!", "Hello  World... don't stop", '(well) -- ok; "quoted" x', "café naïve 日本"]
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    ours = ptb_tokenize(caps + ["one\rtwo\u2028three", "", "...", "?!"])
    assert ours[:4] == [theirs[i][0] for i in range(4)]
    # lower case, punctuation and quotes dropped, clitics split, parentheses kept (a pycocoevalcap quirk)
    assert ours[:4] == ["a man 's dog running", "hello world do n't stop", "-lrb- well -rrb- ok quoted x",
                        "café naïve 日本"]
    assert ours[4:6] == ["one two three", ""]  # line breaks never split a caption
    assert ours[6:] == ["", "?!"]  # "?!" is one PTB token, and not on pycocoevalcap's punctuation list


@java
def test_bleu1_rouge_by_hand():
    r = caption_metrics({"a": "The the cat."}, {"a": ["A cat sat on the mat"]}, meteor=False)
    # prediction "the the cat" (3 tokens), reference "a cat sat on the mat" (6 tokens).
    # Clipped unigram matches: "the" 2 in the prediction, 1 in the reference -> 1; "cat" -> 1: 2 of 3.
    # Brevity penalty: c = 3 < r = 6 -> exp(1 - 6/3) = exp(-1).  BLEU-1 = 2/3 * e^-1 = 0.24525.
    assert r.bleu1 == pytest.approx(2 / 3 * math.exp(-1), rel=1e-6)
    assert r.bleu2 < 1e-6  # no bigram matches ("the cat" is not in the reference)
    # ROUGE-L: LCS = 1 ("the" or "cat"; the reference has them in the other order): P = 1/3, R = 1/6,
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 0.2096.
    p, rec = 1 / 3, 1 / 6
    assert r.rouge_l == pytest.approx((1 + 1.44) * p * rec / (rec + 1.44 * p))
    assert r.meteor is None and r.n == 1


@java
def test_bleu_brevity_uses_the_closest_reference():
    r = caption_metrics({0: "the cat on mat"}, {0: ["a cat", "the cat is on the mat today"]}, meteor=False)
    # 4 tokens, all matched (clipped against the most in any one reference): precision 1.
    # Reference lengths 2 and 7: the closest to 4 is 2 -> c > r, no penalty (the longer one gives exp(1-7/4)).
    assert r.bleu1 == pytest.approx(1.0, rel=1e-6)


@java
def test_bleu_is_corpus_level():
    r = caption_metrics({0: "a cat on a mat", 1: "x"}, {0: ["a cat on a mat"], 1: ["y z"]}, meteor=False)
    # Summed over the corpus: unigram matches 5 + 0 of 5 + 1 guessed; lengths c = 6, r = 5 + 2 = 7:
    # BLEU-1 = 5/6 * exp(1 - 7/6). The mean of the per-caption BLEU-1s would be (1 + 0) / 2.
    assert r.bleu1 == pytest.approx(5 / 6 * math.exp(1 - 7 / 6), rel=1e-6)


@java
def test_cider_is_zero_on_a_single_image():
    # idf = log(number of images) - log(images whose references have the n-gram) = log 1 - log 1 = 0.
    r = caption_metrics({1: "a dog runs on the grass"}, {1: ["a dog runs on the grass"]}, meteor=False)
    assert r.cider == 0.0 and r.bleu4 == pytest.approx(1.0, rel=1e-6) and r.rouge_l == 1.0


@java
def test_coverage_and_missing_scores_as_empty():
    refs = {1: ["a cat on a mat"], "1": ["a dog in the park"], 2: ["a red car"], 3: ["blue sky"]}
    preds = {1: "a cat on a mat", 2: "", 3: "...", "x": "not scored"}
    r = caption_metrics(preds, refs, meteor=False)
    assert (r.n, r.missing, r.extra, r.n_extra, r.n_empty, r.n_answered) == (4, ("1",), ("x",), 1, 2, 3)
    filled = caption_metrics({**preds, "1": ""}, refs, meteor=False)  # "1" given as an empty caption
    assert filled.missing == () and filled.n_empty == 3
    assert filled.scores() == r.scores()


def _fake_meteor(monkeypatch, fail: bool):
    """The real modules, but a Meteor whose process is a sleeping Python (no 10 s start-up)."""
    modules, java_path = captions._require()
    made = []

    class FakeMeteor:
        def __init__(self):
            self.meteor_p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.lock = threading.Lock()
            made.append(self)

        def compute_score(self, gts, res):
            self.lock.acquire()  # as pycocoevalcap's does; a failure leaves it held
            if fail:
                raise ValueError("could not convert string to float: ''")
            self.lock.release()
            return 0.5, [0.5] * len(gts)

    monkeypatch.setattr(captions, "_require", lambda: (SimpleNamespace(**{**vars(modules), "Meteor": FakeMeteor}),
                                                        java_path))
    return made


def _gone(p: subprocess.Popen) -> bool:
    if p.returncode is None:
        return False
    try:
        os.kill(p.pid, 0)
    except ProcessLookupError:
        return True  # reaped: no zombie either
    return False


@java
def test_caption_metrics_stops_meteor(monkeypatch):
    made = _fake_meteor(monkeypatch, fail=False)
    assert caption_metrics(IDENTICAL, REFS).meteor == 0.5
    assert len(made) == 1 and _gone(made[0].meteor_p)


@java
def test_failed_meteor_is_stopped_and_reported(monkeypatch):
    made = _fake_meteor(monkeypatch, fail=True)
    with pytest.raises(CaptionMetricsUnavailable, match="METEOR .* failed"):
        caption_metrics(IDENTICAL, REFS)
    assert _gone(made[0].meteor_p)
    assert made[0].lock.acquire(timeout=1)  # pycocoevalcap's __del__ takes it: must not hang


@pytest.fixture(scope="module")
def corpora(scorer):
    return {name: scorer.score(preds, REFS) for name, preds in
            (("identical", IDENTICAL), ("paraphrase", PARAPHRASE), ("disjoint", DISJOINT))}


@java
def test_identical(corpora):
    r = corpora["identical"]
    # BLEU's smoothing: (matches + 1e-15) / (guesses + 1e-9) -> 1 - 1e-10, not exactly 1.
    assert [r.bleu1, r.bleu2, r.bleu3, r.bleu4] == pytest.approx([1.0] * 4, rel=1e-6)
    assert r.rouge_l == 1.0
    assert r.meteor > 0.9
    # CIDEr: per image the mean over n = 1..4 of cos(tf-idf(prediction), tf-idf(reference)) = 1 each
    # (every order has an n-gram with idf log(3/1) > 0), no length penalty (same length), times 10.
    assert r.cider == pytest.approx(10.0)
    assert (r.n, r.missing, r.extra, r.n_empty) == (3, (), (), 0)


@java
def test_disjoint(corpora):
    r = corpora["disjoint"]
    assert max(r.bleu1, r.bleu2, r.bleu3, r.bleu4) < 1e-6  # smoothing: ~1e-16, not 0
    assert r.rouge_l == 0.0 and r.cider == 0.0 and r.meteor == 0.0


@java
@pytest.mark.parametrize("metric", ["bleu1", "bleu2", "meteor", "rouge_l", "cider"])
def test_identical_beats_paraphrase_beats_disjoint(corpora, metric):
    i, p, d = (getattr(corpora[k], metric) for k in ("identical", "paraphrase", "disjoint"))
    assert i > p > d


@java
def test_close_stops_meteor(scorer, corpora):  # last: the module's scorer is done
    p = scorer._meteor.meteor_p
    scorer.close()
    scorer.close()  # idempotent
    assert _gone(p) and scorer._meteor is None

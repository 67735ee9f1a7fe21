"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr, computed by `pycocoevalcap` (the COCO caption
evaluation code), so that the numbers are the ones papers report.

This module owns: checking the inputs (question_id → prediction, question_id → reference captions; ids
are int or str and kept exactly, as in `vitune.data.vqa_format`), the PTB tokenisation of every caption,
running the pycocoevalcap scorers, closing the METEOR process, coverage, and the table.

Needs `pip install 'vitune[eval]'` (pycocoevalcap) and Java (`apt-get install default-jre-headless`):
the PTB tokenizer (Stanford CoreNLP) and METEOR 1.5 are Java programs shipped inside pycocoevalcap.
Both are imported / checked only when captions are scored, and a missing one raises
`CaptionMetricsUnavailable` naming what to install. SPICE is not computed: it needs Stanford CoreNLP
models downloaded on first use (hundreds of MB) on top of its jar.

What the numbers are (pycocoevalcap's definitions, kept as they are):
- Tokenisation: Stanford PTBTokenizer, lower-cased, with the COCO punctuation list removed (`. , ? ! : ;`,
  quotes, dashes); "don't" becomes "do n't". Parentheses are *not* removed: the list names `-LRB-`
  while the lower-cased tokenizer writes `-lrb-`. Captions are passed to the tokenizer on stdin, one
  per line (all whitespace, line breaks included, collapsed to one space first), with the same jar and
  flags as `pycocoevalcap.tokenizer.PTBTokenizer`, whose own wrapper writes a temporary file into its
  package directory and silently misaligns captions on line breaks or trailing empty captions.
- BLEU is corpus-level: clipped n-gram matches and lengths are summed over all captions before the
  ratio, and the brevity penalty uses, per caption, the reference length closest to the prediction's.
  It is not the mean of per-caption BLEU. A tiny smoothing (1e-15 / 1e-9) makes "no match" ~1e-16
  rather than 0, and identical text 1 - 1e-10 rather than 1.
- METEOR (1.5, `-l en -norm`) is also corpus-level: from statistics summed over captions, not the
  mean of per-caption scores. Its process loads a paraphrase table at start (about 10 s, 2 GB heap
  allowed); `CaptionScorer` keeps one process for several scorings and always stops it.
- ROUGE-L: mean over captions of the LCS F-measure (beta 1.2) with the best precision and the best
  recall over the references.
- CIDEr: mean over captions; TF-IDF weights come from the references being scored, so it depends on
  the corpus: over a single image every n-gram has idf 0 and CIDEr is 0 whatever the prediction.
  A prediction identical to its single reference scores 10 when each n-gram order (1..4) has an
  n-gram not found in every image's references.

Coverage is part of every result: `missing` (ids with references but no prediction: scored as an
empty caption, i.e. no matches, and their reference length still counts for BLEU's brevity penalty),
`extra` (predictions for ids without references: ignored) and `n_empty` (predictions that are empty
or blank, or become empty once punctuation is removed: scored as given, like a missing one).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from vitune.evaluation.metrics import _ids

QuestionId = int | str

INSTALL_PACKAGE = "pip install 'vitune[eval]'"
INSTALL_JAVA = "apt-get install default-jre-headless"


class CaptionMetricsUnavailable(RuntimeError):
    """pycocoevalcap or Java is missing (the message says what to install), or a Java part failed."""


@dataclass(frozen=True)
class CaptionResult:
    """Scores in [0, 1] (CIDEr in [0, 10]) over the `n` ids that have reference captions."""
    bleu1: float
    bleu2: float
    bleu3: float
    bleu4: float
    meteor: float | None  # None only when scored with meteor=False
    rouge_l: float
    cider: float
    n: int
    missing: tuple[QuestionId, ...] = ()  # ids with references but no prediction (scored as empty)
    n_extra: int = 0  # predictions for ids without references (ignored)
    extra: tuple[QuestionId, ...] = ()
    n_empty: int = 0  # predictions scored that are empty after tokenisation ("", blank, punctuation only)

    @property
    def n_missing(self) -> int:
        return len(self.missing)

    @property
    def n_answered(self) -> int:
        """Scored ids that have a prediction."""
        return self.n - self.n_missing

    def scores(self) -> dict[str, float | None]:
        return {"BLEU-1": self.bleu1, "BLEU-2": self.bleu2, "BLEU-3": self.bleu3, "BLEU-4": self.bleu4,
                "METEOR": self.meteor, "ROUGE-L": self.rouge_l, "CIDEr": self.cider}

    def to_dict(self) -> dict[str, Any]:
        """Every field (as `dataclasses.asdict`) plus the derived counts."""
        out = asdict(self)
        out.update(n_missing=self.n_missing, n_answered=self.n_answered)
        return out


def _require() -> tuple[SimpleNamespace, str]:
    """pycocoevalcap (the parts used) and the java on PATH, or a clear error."""
    try:
        from pycocoevalcap.bleu import bleu
        from pycocoevalcap.cider import cider
        from pycocoevalcap.meteor import meteor
        from pycocoevalcap.rouge import rouge
        from pycocoevalcap.tokenizer import ptbtokenizer as ptb
    except ImportError as e:
        raise CaptionMetricsUnavailable(
            f"caption metrics need the pycocoevalcap package ({e}): {INSTALL_PACKAGE}") from e
    java = shutil.which("java")
    if java is None:
        raise CaptionMetricsUnavailable(
            "caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR are Java programs) and there "
            f"is no `java` on PATH: install a Java runtime, e.g. {INSTALL_JAVA}")
    return SimpleNamespace(Bleu=bleu.Bleu, Cider=cider.Cider, Meteor=meteor.Meteor, Rouge=rouge.Rouge, ptb=ptb), java


def _one_line(text: str) -> str:
    """All whitespace (line breaks, tabs, U+2028 ...) collapsed to single spaces: one caption, one line."""
    return " ".join(text.split())


def ptb_tokenize(captions: Sequence[str], _modules: Any = None, _java: str | None = None) -> list[str]:
    """pycocoevalcap's tokenisation of each caption (see the module docstring), in order."""
    m, java = (_modules, _java) if _modules is not None else _require()
    lines = [_one_line(c) for c in captions]
    todo = [i for i, line in enumerate(lines) if line]  # blank ones stay "" (and never reach Java)
    out = [""] * len(lines)
    if not todo:
        return out
    jar = Path(m.ptb.__file__).parent / m.ptb.STANFORD_CORENLP_3_4_1_JAR
    cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
           "-encoding", "utf-8"]
    text = "".join(lines[i] + "\n" for i in todo).encode("utf-8")
    proc = subprocess.run(cmd, input=text, capture_output=True, check=False)
    got = proc.stdout.decode("utf-8").split("\n")
    if got and got[-1] == "":
        got.pop()
    if proc.returncode != 0 or len(got) != len(todo):
        err = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise CaptionMetricsUnavailable(
            f"the PTB tokenizer ({' '.join(cmd[:4])}) failed: exit {proc.returncode}, {len(got)} of {len(todo)} "
            f"captions came back" + (f": {err}" if err else ""))
    punct = set(m.ptb.PUNCTUATIONS)
    for i, line in zip(todo, got):
        out[i] = " ".join(w for w in line.rstrip().split(" ") if w and w not in punct)
    return out


def _check(predictions: Mapping[QuestionId, str],
           references: Mapping[QuestionId, Sequence[str] | str]) -> dict[QuestionId, list[str]]:
    if not references:
        raise ValueError("caption_metrics: no reference captions to score against")
    refs: dict[QuestionId, list[str]] = {}
    for qid, r in references.items():
        r = [r] if isinstance(r, str) else list(r)
        if not r:
            raise ValueError(f"caption_metrics: id {qid!r} has no reference captions")
        for k, c in enumerate(r):
            if not isinstance(c, str):
                raise ValueError(f"caption_metrics: reference {k} of id {qid!r} must be a string, "
                                 f"got {type(c).__name__}")
            if not c.strip():
                raise ValueError(f"caption_metrics: reference {k} of id {qid!r} is empty")
        refs[qid] = r
    for qid, p in predictions.items():
        if not isinstance(p, str):
            raise ValueError(f"caption_metrics: prediction for id {qid!r} must be a string, got {type(p).__name__}")
    return refs


class CaptionScorer:
    """Scores prediction sets, keeping one METEOR process for all of them (its start-up takes ~10 s).

        with CaptionScorer() as scorer:
            a = scorer.score(predictions_a, references)
            b = scorer.score(predictions_b, references)

    `meteor=False` skips METEOR (no process, `CaptionResult.meteor` is None). The process starts
    here, so that it loads while the captions are tokenised and the other metrics computed, and is
    stopped by `close()` (or leaving the `with` block); scoring after `close()` starts a new one.
    """

    def __init__(self, meteor: bool = True):
        self._modules, self._java = _require()
        self.use_meteor = meteor
        self._meteor: Any = self._modules.Meteor() if meteor else None

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing to report to at interpreter exit
            pass

    def close(self) -> None:
        """Stop the METEOR process (idempotent). pycocoevalcap's Meteor has no close(), only a __del__
        that takes its lock first, a lock a failed compute_score leaves held, so: done here, lock-free."""
        meteor, self._meteor = getattr(self, "_meteor", None), None
        if meteor is None:
            return
        p = meteor.meteor_p
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stderr.close()
        meteor.lock = threading.Lock()  # its __del__ (at garbage collection) then only repeats the above

    def _meteor_score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
        if self._meteor is None:
            self._meteor = self._modules.Meteor()
        try:
            score, _ = self._meteor.compute_score(gts, res)
        except (ValueError, OSError) as e:  # the jar died or answered nonsense
            p = self._meteor.meteor_p
            if p.poll() is None:
                p.kill()
            p.wait()
            err = p.stderr.read().decode("utf-8", "replace").strip()[-2000:]
            self.close()
            raise CaptionMetricsUnavailable(f"METEOR (java -jar meteor-1.5.jar) failed, exit {p.returncode}: "
                                            f"{err or e}") from e
        return float(score)

    def score(self, predictions: Mapping[QuestionId, str],
              references: Mapping[QuestionId, Sequence[str] | str]) -> CaptionResult:
        """Score every id in `references`; see the module docstring for what each number is."""
        refs = _check(predictions, references)
        ids = list(refs)
        missing = tuple(qid for qid in ids if qid not in predictions)
        extra = tuple(qid for qid in predictions if qid not in refs)
        # One tokenizer run for everything: the predictions, then every reference, in id order.
        texts = [predictions.get(qid, "") for qid in ids] + [c for qid in ids for c in refs[qid]]
        tokens = ptb_tokenize(texts, self._modules, self._java)
        res = {i: [tokens[i]] for i in range(len(ids))}
        gts, at = {}, len(ids)
        for i, qid in enumerate(ids):
            gts[i] = tokens[at:at + len(refs[qid])]
            at += len(refs[qid])
            for k, t in enumerate(gts[i]):
                if not t:
                    raise ValueError(f"caption_metrics: reference {k} of id {qid!r} is only punctuation "
                                     f"({refs[qid][k]!r}), nothing is left to score against")
        n_empty = sum(1 for i, qid in enumerate(ids) if qid in predictions and not tokens[i])
        bleu, _ = self._modules.Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = self._modules.Rouge().compute_score(gts, res)
        cider, _ = self._modules.Cider().compute_score(gts, res)
        meteor = self._meteor_score(gts, res) if self.use_meteor else None
        return CaptionResult(*(float(b) for b in bleu), meteor, float(rouge), float(cider), len(ids), missing,
                             len(extra), extra, n_empty)


def caption_metrics(predictions: Mapping[QuestionId, str], references: Mapping[QuestionId, Sequence[str] | str],
                    *, meteor: bool = True) -> CaptionResult:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of `predictions` (id → caption) against `references`
    (id → one or more captions). One METEOR process, started and stopped here; to score several
    prediction sets use `CaptionScorer`."""
    _check(predictions, references)  # bad input fails before Java starts
    with CaptionScorer(meteor=meteor) as scorer:
        return scorer.score(predictions, references)


def format_captions(result: CaptionResult) -> str:
    """A plain-text table: one row per metric (x100, as papers report them), then coverage lines."""
    lines = [f"{'metric':<8}  {'score':>6}"]
    for name, value in result.scores().items():
        lines.append(f"{name:<8}  {'-' if value is None else f'{100 * value:.1f}':>6}")
    lines.append("-" * len(lines[0]))
    lines.append(f"{'n':<8}  {result.n:>6}")
    if result.meteor is None:
        lines.append("METEOR not computed (meteor=False)")
    if result.n_missing:
        lines.append(f"coverage: {result.n_answered} of {result.n} scored ids have a prediction")
        lines.append(f"{result.n_missing} id(s) had no prediction and are scored as an empty caption: "
                     f"{_ids(result.missing)}")
    if result.n_extra:
        lines.append(f"{result.n_extra} prediction(s) for ids without reference captions, not scored: "
                     f"{_ids(result.extra)}")
    if result.n_empty:
        lines.append(f"{result.n_empty} prediction(s) are empty (after tokenisation) and scored as given")
    return "\n".join(lines)

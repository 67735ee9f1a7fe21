"""The evaluation tasks: scoring predictions (`TASKS`: "vqa", "pope", "choice") and retrieval.

`eval_vqa` scores predictions against reference answers with the VQAv2 rule
(`answers.vqa_accuracy`), overall and per category, with its coverage explicit; `eval_pope` adds
the POPE yes/no metrics per sampling (the questions' category); `eval_choice` reads the option
letter out of each answer (`choice.extract_letter`) and lists the unparseable ones. (Captions are
scored by `caption_results`.) The predictions themselves come
from `predict.run_predict`. `eval_retrieval` is the one task without predictions: Recall@K of a
model's alignment head on a captions file (`read_captions`; its own section below).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm import tqdm

from vitune.checkpoints.model_folder import resolve_model_dir
from vitune.data.processor import ImageTransform, _encode_text, load_image, pad_instructions
from vitune.data.vqa_format import QuestionId, read_answers, read_questions
from vitune.evaluation.answering import _batches
from vitune.evaluation.choice import answer_letters, extract_letter
from vitune.evaluation.metrics import UNCATEGORISED, VQAResult, id_type_mismatch, score_vqa
from vitune.evaluation.pope import PopeResult, pope_metrics
from vitune.evaluation.retrieval import DEFAULT_KS, RetrievalResult, recall_at_k
from vitune.files import DataError, read_json_records


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


# -- scoring ----------------------------------------------------------------------------------------

def _same_id_types(ids, questions: Mapping, name: str, questions_name: str) -> None:
    hit = id_type_mismatch(ids, questions)
    if hit is not None:
        got, want = hit
        raise DataError(f"question_id types differ: {name} use {got!r} ({type(got).__name__}) where {questions_name} "
                        f"use {want!r} ({type(want).__name__}); ids are compared exactly (1 and \"1\" are different "
                        "ids), so these never match: write them with the same type")


def eval_vqa(questions_path: str, answers_path: str, predictions: Mapping[QuestionId, str],
             predictions_name: str = "the predictions",
             scorer: Callable[[str, list[str]], float] | None = None) -> VQAResult:
    """Score the questions that have reference answers with the VQAv2 rule (`answers.vqa_accuracy`:
    its normalisation; 10 references: the leave-one-out mean, else a match with any of them); each
    question's score is in `VQAResult.scores`. Questions without a prediction count as
    wrong (`missing`); predictions for ids that are not questions are not scored (`extra`);
    questions without references and references without a question are counted, not scored.
    Ids of another type than the questions' ("0" for 0), or nothing to score or nothing
    matching at all, raise a `DataError`. `scorer(prediction, references)` replaces the VQAv2 rule."""
    questions = {q.question_id: q for q in read_questions(questions_path)}
    answers = read_answers(answers_path)
    qname = f"the questions ({questions_path})"
    _same_id_types(answers, questions, f"the reference answers ({answers_path})", qname)
    _same_id_types(predictions, questions, predictions_name, qname)
    scored = {qid: answers[qid] for qid in questions if qid in answers}
    if not scored:
        raise DataError(f"no question in {questions_path} has a reference answer in {answers_path}: nothing to score")
    if not predictions:
        raise DataError(f"{predictions_name} holds no predictions: nothing to score")
    if not any(qid in predictions for qid in scored):
        raise DataError(f"none of the {len(predictions)} predictions in {predictions_name} is for a question of "
                        f"{questions_path} with a reference answer: nothing matches")
    categories = {qid: q.category for qid, q in questions.items() if q.category}
    result = score_vqa(predictions, scored, categories or None, scorer)
    extra = tuple(pid for pid in predictions if pid not in questions)
    return dataclasses.replace(result, n_extra=len(extra), extra=extra, n_no_reference=len(questions) - len(scored),
                               n_unused_answers=sum(1 for a in answers if a not in questions))


@dataclass(frozen=True)
class PopeEvaluation:
    """POPE: `result` is the yes/no accuracy as a VQA result (per sampling, with its coverage and
    per-question scores); `overall` and `per_category` (sampling → metrics) the POPE metrics."""

    result: VQAResult
    overall: PopeResult
    per_category: dict[str, PopeResult]


def eval_pope(questions_path: str, answers_path: str, predictions: Mapping[QuestionId, str],
              predictions_name: str = "the predictions") -> PopeEvaluation:
    """`eval_vqa` (checks, coverage; an answer scores 1 when it normalises to the yes/no reference)
    plus `pope.pope_metrics` overall and per category (the sampling: random, popular, adversarial)."""
    result = eval_vqa(questions_path, answers_path, predictions, predictions_name)
    answers = read_answers(answers_path)
    scored = {qid: answers[qid] for qid in result.scores}
    categories = {q.question_id: q.category for q in read_questions(questions_path)}
    try:
        overall = pope_metrics(predictions, scored)
        groups: dict[str, dict] = {}
        for qid, refs in scored.items():
            groups.setdefault(categories.get(qid) or "(none)", {})[qid] = refs
        per_category = {c: pope_metrics(predictions, g) for c, g in sorted(groups.items())}
    except ValueError as e:
        raise DataError(f"{answers_path}: not a POPE answers file: {e}") from None
    return PopeEvaluation(result, overall, per_category)


@dataclass(frozen=True)
class ChoiceEvaluation:
    """Multiple choice: `result` the accuracy (1 when `choice.extract_letter` reads the answer's
    letter out of the prediction), `unparseable` the answered questions whose prediction names no
    single option letter (counted wrong, and listed; and counted per category), `letters` the
    letters read."""

    result: VQAResult
    unparseable: tuple[QuestionId, ...]
    letters: str
    unparseable_per_category: dict[str, int]


def eval_choice(questions_path: str, answers_path: str, predictions: Mapping[QuestionId, str],
                predictions_name: str = "the predictions") -> ChoiceEvaluation:
    """`eval_vqa`'s checks and coverage, each answer key one option letter (`choice.answer_letters`),
    a prediction right when the one letter it names (`choice.extract_letter`) is the key's."""
    try:
        letters = answer_letters(read_answers(answers_path))
    except ValueError as e:
        raise DataError(f"{answers_path}: not a multiple-choice answers file: {e}") from None

    def scorer(prediction: str, refs: list[str]) -> float:
        return float(extract_letter(prediction, letters) == refs[0].strip().upper())

    result = eval_vqa(questions_path, answers_path, predictions, predictions_name, scorer)
    unparseable = tuple(q for q in result.scores if q in predictions and extract_letter(predictions[q], letters) is None)
    per_category: dict[str, int] = {}
    if result.per_category:
        categories = {q.question_id: q.category or UNCATEGORISED for q in read_questions(questions_path)}
        for q in unparseable:
            per_category[categories[q]] = per_category.get(categories[q], 0) + 1
    return ChoiceEvaluation(result, unparseable, letters, per_category)


Evaluation = VQAResult | PopeEvaluation | ChoiceEvaluation
TASKS: dict[str, Callable[..., Evaluation]] = {"vqa": eval_vqa, "pope": eval_pope, "choice": eval_choice}


def vqa_result(evaluation: Evaluation) -> VQAResult:
    """The per-question accuracy every scored task has."""
    return evaluation if isinstance(evaluation, VQAResult) else evaluation.result


# -- retrieval --------------------------------------------------------------------------------------

RETRIEVAL = "retrieval"
CAPTION = "caption"  # scored by caption_results, not here


@dataclass(frozen=True)
class RetrievalEvaluation:
    """Recall@K of a model's alignment head on a captions file (`eval_retrieval`)."""

    result: RetrievalResult
    images: tuple[str, ...]  # the gallery, in first-appearance order (paths as the file gives them)
    n_captions: int
    text_max_len: int  # captions are cut to this many tokens, as in training
    n_cut: int  # captions that were cut


def read_captions(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(image, caption, where) per row of a captions file (retrieval's and captioning's input):
    JSONL (or a JSON list) of {"image": path relative to the image root, "caption": text}; an image
    may have several rows."""
    rows = read_json_records(path)
    if not rows:
        raise DataError(f"{path}: holds no captions")
    out = []
    for k, row in enumerate(rows, 1):
        where = f"{path}: row {k}"
        for key in ("image", "caption"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f'{where}: needs a non-empty string "{key}" (a captions file holds '
                                '{"image": PATH, "caption": TEXT} rows)')
        out.append((row["image"], row["caption"], where))
    return out


def eval_retrieval(model_dir: str | os.PathLike, captions_path: str | os.PathLike,
                   image_root: str | os.PathLike | None = None, batch_size: int = 32,
                   ks: tuple[int, ...] = DEFAULT_KS, progress: bool = False,
                   log: Callable[[str], None] = _log) -> RetrievalEvaluation:
    """Image-text retrieval with the model's alignment head (`model.contrastive`): every distinct
    image of the captions file (`read_captions`; image paths relative to `image_root`, default the
    file's folder) is embedded with `embed_images` (the vision transform of training), every caption
    with `embed_texts` (encoded as training encodes captions: `im_start` + its ids, cut to
    `model.contrastive.text.max_len`, padded with the tokenizer's eos), and `retrieval.recall_at_k`
    ranks them (cosine; each caption's own image; an image's hit: any of its captions). Eval mode,
    no autograd, fp32 on the CPU: deterministic. A model without an alignment head is refused
    before its weights load."""
    from vitune.checkpoints.model_folder import load_pretrained, read_model_config
    _batches([], batch_size)  # checks it
    folder = resolve_model_dir(model_dir)
    cfg, _ = read_model_config(folder)
    if not cfg.contrastive.dim:
        raise DataError(f"{folder}: this model has no alignment head (model.contrastive.dim = 0), so it has no "
                        "image and text embeddings to rank; retrieval needs a model trained with "
                        "model.contrastive.dim=N > 0 and a stage with contrastive_weight > 0")
    rows = read_captions(captions_path)
    root = Path(image_root) if image_root else Path(captions_path).parent
    index: dict[str, int] = {}
    first: dict[str, str] = {}
    for image, _, where in rows:
        if image not in index:
            index[image], first[image] = len(index), where
            if not (root / image).is_file():
                raise DataError(f"{where}: image not found: {root / image}")
    model, tok = load_pretrained(folder)
    model.eval()
    max_len = model.cfg.contrastive.text.max_len
    cut: list[str] = []
    texts = [_encode_text(tok, c, max_len, f"{where}: caption", "text encoder", cut.append) for _, c, where in rows]
    if cut:
        log(f"note: {len(cut)} of {len(rows)} captions cut to the text encoder's max_len={max_len} (as in training); "
            f"the first: {cut[0]}")
    transform = ImageTransform.for_vision(model.cfg.vision)
    images = list(index)
    image_emb, text_emb = [], []
    with torch.no_grad(), tqdm(total=len(images) + len(texts), desc="embed", disable=not progress,
                               dynamic_ncols=True) as bar:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            pixels = transform([load_image(root / im, first[im]) for im in chunk])
            image_emb.append(model.embed_images(pixels).float())
            bar.update(len(chunk))
        for i in range(0, len(texts), batch_size):
            ids, mask = pad_instructions(texts[i:i + batch_size], tok.special.eos)
            text_emb.append(model.embed_texts(ids, mask).float())
            bar.update(len(ids))
    result = recall_at_k(torch.cat(image_emb), torch.cat(text_emb), [index[im] for im, _, _ in rows], ks)
    return RetrievalEvaluation(result, tuple(images), len(rows), max_len, len(cut))

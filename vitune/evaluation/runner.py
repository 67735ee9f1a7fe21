"""Evaluation runners: VQA-style tasks from the LLaVA evaluation format.

`predict_vqa` answers questions with a model (batched, with a progress bar), `run_predict` does it
for a questions file into a predictions file, and `eval_vqa` scores predictions against reference
answers with the VQAv2 rule (`answers.vqa_accuracy`), overall and per category, with its coverage
explicit; `eval_pope` adds the POPE yes/no metrics per sampling (the questions' category).
`eval_retrieval` is the one task without predictions: Recall@K of a model's alignment head on a
captions file (its own section below).
`run_predict` asks each question as `prompt` says: "{question}" (the default) is the text as given.

`run_predict` never loses work and never writes where it must not:
- the output is checked before the model loads: not a folder, its folder writable or creatable,
  not one of the inputs, and not an existing file unless `overwrite` (`check_output`);
- answers are appended batch by batch to `OUT.partial` (flushed and fsynced), whose first line
  names the questions file and the model; at the end they are written to OUT in question order
  (atomically) and the partial file is removed. Rerunning the same command after an interruption
  keeps the answers there (a half-written last line is dropped) and answers only the rest; a
  partial file of other questions or another model is an error asking to delete it;
- `on_bad_record="error"` (default) stops at the first question whose image is missing or corrupt,
  whose `<image>` tags do not match its image, or whose prompt is too long, naming the question
  (the answers so far stay in OUT.partial); `"skip"` writes such questions to `OUT.errors.jsonl`
  ({"question_id", "error"}) and answers the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping

import torch
from PIL import Image
from tqdm import tqdm

from vitune.checkpoints.model_folder import resolve_model_dir
from vitune.data.processor import (
    ImageTransform,
    _encode_text,
    load_image,
    pad_instructions,
)
from vitune.data.vqa_format import (
    Question,
    QuestionId,
    prediction_row,
    read_answers,
    read_questions,
    write_predictions,
)
from vitune.evaluation.metrics import VQAResult, id_type_mismatch, score_vqa
from vitune.evaluation.pope import PopeResult, pope_metrics
from vitune.evaluation.retrieval import DEFAULT_KS, RetrievalResult, recall_at_k
from vitune.files import DataError, atomic_write_jsonl, read_json_records
from vitune.inference.assistant import Assistant, Request, user_turn
from vitune.inference.generate import GenerationConfig

# Short answers are what VQA references hold; keep generation bounded.
VQA_GENERATION = GenerationConfig(max_new_tokens=16)
BAD_RECORD_POLICIES = ("error", "skip")
PARTIAL_FORMAT = "vitune-partial-predictions"
QUESTION = "{question}"  # the prompt template that asks the question text as given


def render_prompt(template: str, text: str) -> str:
    """The template with its one `{question}` replaced by the question text (no other fields)."""
    if template.count(QUESTION) != 1:
        raise ValueError(f"a prompt template must hold {QUESTION} exactly once, got {template!r}")
    return template.replace(QUESTION, text)

Answered = list[tuple[Question, str]]


def _check_policy(on_bad_record: str) -> None:
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {list(BAD_RECORD_POLICIES)}, got {on_bad_record!r}")


def predict_batches(
    assistant: Assistant, questions: list[Question], image_root: Path, batch_size: int = 32,
    gen: GenerationConfig = VQA_GENERATION, on_bad_record: str = "error", progress: bool = True,
) -> Iterator[tuple[Answered, list[dict]]]:
    """Yield each batch's `(answered (question, text) pairs, errors)` as it is done; an image's
    questions are batched together, so the prompt start they share (system prompt and image tokens)
    runs once per batch (`Assistant.answer_batch`). A bad question raises a `DataError` naming it
    (`on_bad_record="error"`, after yielding what its batch answered) or becomes an error row
    {"question_id", "error"} (`"skip"`)."""
    _check_policy(on_bad_record)
    cache: dict[str, Image.Image | DataError] = {}
    with tqdm(total=len(questions), desc="predict", disable=not progress, dynamic_ncols=True) as bar:
        for chunk in _batches(questions, batch_size):
            cache = {q.image: cache[q.image] for q in chunk if q.image in cache}  # only the images still asked about
            items, errors = [], []
            for q in chunk:
                try:
                    items.append((q, _request(image_root, q, cache)))
                except DataError as e:
                    if on_bad_record == "error":
                        raise
                    errors.append({"question_id": q.question_id, "error": str(e)})
            answered, failure = _answer(assistant, items, gen, on_bad_record, errors)
            bar.update(len(chunk))
            yield answered, errors
            if failure is not None:
                raise failure


def _answer(assistant: Assistant, items: list[tuple[Question, Request]], gen: GenerationConfig,
            on_bad_record: str, errors: list[dict]) -> tuple[Answered, DataError | None]:
    """The batch's answers; if it is refused (a request's `<image>` count or length: the
    assistant's errors name no question), one by one to find and name the bad question(s)."""
    if not items:
        return [], None
    try:
        return list(zip((q for q, _ in items), assistant.answer_batch([r for _, r in items], gen), strict=True)), None
    except ValueError:
        pass
    out: Answered = []
    for q, r in items:
        try:
            out.append((q, assistant.answer_batch([r], gen)[0]))
        except ValueError as e:
            err = DataError(f"question {q.question_id!r}: {e}")
            if on_bad_record == "error":
                return out, err
            errors.append({"question_id": q.question_id, "error": str(err)})
    return out, None


def predict_vqa(
    assistant: Assistant, questions: list[Question], image_root: Path, batch_size: int = 32,
    gen: GenerationConfig = VQA_GENERATION, progress: bool = True, on_bad_record: str = "error",
    errors: list[dict] | None = None,
) -> list[dict]:
    """Answers in question order (`predict_batches`); with `on_bad_record="skip"` the skipped
    questions are left out and their error rows appended to `errors` (when given)."""
    answers = {}
    for answered, errs in predict_batches(assistant, questions, image_root, batch_size, gen, on_bad_record, progress):
        answers.update((id(q), t) for q, t in answered)
        if errors is not None:
            errors += errs
    return [{"question_id": q.question_id, "text": answers[id(q)]} for q in questions if id(q) in answers]


def _batches(questions: list[Question], batch_size: int) -> list[list[Question]]:
    """Batches of one image's questions where it has several; the other questions batched together."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    by_image: dict[str, list[Question]] = {}
    for q in questions:
        by_image.setdefault(q.image, []).append(q)
    shared = [g for g in by_image.values() if len(g) > 1]
    singles = [g[0] for g in by_image.values() if len(g) == 1]
    out = [g[i:i + batch_size] for g in shared for i in range(0, len(g), batch_size)]
    return out + [singles[i:i + batch_size] for i in range(0, len(singles), batch_size)]


def _request(root: Path, q: Question, cache: dict) -> Request:
    image = _image(root, q, cache)
    try:
        turn = user_turn(q.text, 1)
    except ValueError as e:  # text the user turn refuses
        raise DataError(f"question {q.question_id!r}: {e}") from None
    return Request([image], [turn])


def _image(root: Path, q: Question, cache: dict) -> Image.Image:
    """The question's image, loaded once per batch group; a bad one is remembered as its error."""
    if q.image not in cache:
        try:
            cache[q.image] = load_image(root / q.image)
        except DataError as e:
            cache[q.image] = e
    got = cache[q.image]
    if isinstance(got, DataError):
        raise DataError(f"question {q.question_id!r}: {got}")
    return got


# -- predictions files ------------------------------------------------------------------------------

def partial_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.partial")


def errors_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.errors.jsonl")


def check_output(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], overwrite: bool = False,
                 flag: str = "--out", sidecars: bool = True) -> Path:
    """Refuse, before any work, an output file path that is a folder, whose folder cannot be
    written or created, that is (or whose `.partial` / `.errors.jsonl` is) one of the `inputs`
    (name → path), or that exists already (unless `overwrite`)."""
    text = os.fspath(out)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise DataError(f"{flag} {text}: is a folder; give a file path, such as {path / 'predictions.jsonl'}")
    targets = [path, *([partial_path(path), errors_path(path)] if sidecars else [])]
    for name, given in inputs.items():
        if given is None:
            continue
        for t in targets:
            if t.resolve() == Path(given).resolve():
                what = text if t == path else f"{text} (its {t.name})"
                raise DataError(f"{flag} {what} would overwrite the {name} {os.fspath(given)}; choose another path")
    folder = path.resolve().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{flag} {text}: cannot create its folder: {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {text}: cannot write in {folder} (permission denied)")
    if path.exists() and not overwrite:
        raise DataError(f"{flag} {text} already exists; pass --overwrite to replace it, or choose another path")
    return path


@dataclass(frozen=True)
class PredictReport:
    out: Path
    n: int  # predictions written to `out`, resumed ones included
    n_questions: int
    resumed: int = 0  # answers kept from an interrupted run's partial file
    skipped: int = 0  # questions written to `errors_file` instead (on_bad_record="skip")
    errors_file: Path | None = None

    def summary(self) -> str:
        text = f"wrote {self.n} predictions to {self.out}"
        if self.skipped:
            text += f"; {self.skipped} questions skipped (see {self.errors_file})"
        return text


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_predict(model_dir: str, questions_path: str, out_path: str, image_root: str | None = None,
                batch_size: int = 32, progress: bool = True, precision: str = "fp32", on_bad_record: str = "error",
                overwrite: bool = False, gen: GenerationConfig = VQA_GENERATION,
                log: Callable[[str], None] = _log, prompt: str = QUESTION) -> PredictReport:
    """Answer a questions file into a predictions file; see the module docstring for the checks,
    the partial file (resume) and the bad-question policies. `log` gets the resume notice.
    `prompt` is the template each question's text is asked through (`render_prompt`)."""
    _check_policy(on_bad_record)
    render_prompt(prompt, "")  # checks it
    _batches([], batch_size)  # checks it
    root = Path(image_root) if image_root else Path(questions_path).parent
    out = check_output(out_path, {"questions file": questions_path, "model folder": model_dir,
                                  "image root": image_root}, overwrite)
    folder = resolve_model_dir(model_dir)
    questions = read_questions(questions_path)
    if not questions:
        raise DataError(f"{questions_path}: holds no questions")
    if prompt != QUESTION:
        questions = [dataclasses.replace(q, text=render_prompt(prompt, q.text)) for q in questions]
    if on_bad_record == "error":  # a missing image stops the run before the model loads
        first = {}
        for q in questions:
            first.setdefault(q.image, q)
        for image, q in first.items():
            if not (root / image).is_file():
                raise DataError(f"question {q.question_id!r}: image not found: {root / image}")
    partial = partial_path(out)
    weights = (folder / "model.safetensors").stat()
    header = {"format": PARTIAL_FORMAT, "questions": str(Path(questions_path).resolve()), "model": str(folder.resolve()),
              "weights": f"{weights.st_size}:{weights.st_mtime_ns}"}  # a model saved again since: not the same one
    if prompt != QUESTION:
        header["prompt"] = prompt
    kept = _resume(partial, header, questions, questions_path)
    done = kept or {}
    resumed = len(done)
    if resumed:
        log(f"resuming: {resumed} of {len(questions)} answers kept from {partial}")
    todo = [q for q in questions if q.question_id not in done]
    errors: list[dict] = []
    if todo:
        assistant = Assistant.load(folder, precision=precision)
        with _open_partial(partial, header, fresh=kept is None) as f:
            try:
                for answered, errs in predict_batches(assistant, todo, root, batch_size, gen, on_bad_record, progress):
                    _append(f, answered)
                    done.update((q.question_id, t) for q, t in answered)
                    errors += errs
            except DataError as e:
                raise DataError(f"{e}\n{len(done)} answer(s) so far are kept in {partial}: fix this and rerun the same "
                                "command to continue, or pass --on-bad-record skip to skip such questions") from e
            except KeyboardInterrupt:
                log(f"interrupted: {len(done)} answer(s) kept in {partial}; rerun the same command to continue")
                raise
    rows = [{"question_id": q.question_id, "text": done[q.question_id]} for q in questions if q.question_id in done]
    errs_file = errors_path(out)
    if errors:
        atomic_write_jsonl(errs_file, errors)
    else:
        errs_file.unlink(missing_ok=True)  # an earlier run's, for questions answered now
    n = write_predictions(out, rows)
    partial.unlink(missing_ok=True)
    return PredictReport(out, n, len(questions), resumed, len(errors), errs_file if errors else None)


def _resume(partial: Path, header: dict, questions: list[Question], questions_path: str) -> dict[QuestionId, str] | None:
    """The answers an interrupted run left in `partial` (None: no usable partial file). The file is
    cut after its last complete line, so a half-written one is dropped and appending goes on."""
    if not partial.exists():
        return None
    data = partial.read_bytes()
    hint = f"delete {partial} to start over"
    lines = data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
    if not lines:  # not even the header got written
        return None
    try:
        got = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        got = None
    if not isinstance(got, dict) or got.get("format") != PARTIAL_FORMAT:
        raise DataError(f"{partial}: not a vitune partial predictions file (line 1); {hint}")
    for key in ("questions", "model"):
        if got.get(key) != header[key]:
            raise DataError(f"{partial} holds answers for {key} {got.get(key)}, not {header[key]}: rerun that "
                            f"command to continue it, or {hint}")
    if got.get("prompt", QUESTION) != header.get("prompt", QUESTION):
        raise DataError(f"{partial} holds answers to the prompt {got.get('prompt', QUESTION)!r}, not "
                        f"{header.get('prompt', QUESTION)!r}; {hint}")
    if got.get("weights") != header["weights"]:
        raise DataError(f"{partial} holds answers of an earlier save of the model in {header['model']} (it was "
                        f"saved again since); {hint}")
    ids = {q.question_id for q in questions}
    seen: set = set()
    done: dict[QuestionId, str] = {}
    keep = len(lines[0]) + 1
    for k, line in enumerate(lines[1:], 2):
        where = f"{partial}: line {k}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if k == len(lines):
                break  # the last line, cut short
            raise DataError(f"{where}: malformed JSON; {hint}") from None
        try:
            qid, text = prediction_row(row, where, seen)
        except DataError as e:
            raise DataError(f"{e}; {hint}") from None
        if qid not in ids:
            raise DataError(f"{where}: question_id {qid!r} is not a question in {questions_path}: the partial file "
                            f"does not match the questions; {hint}")
        done[qid] = text
        keep += len(line) + 1
    if keep < len(data):
        os.truncate(partial, keep)
    return done


def _open_partial(partial: Path, header: dict, fresh: bool) -> IO[str]:
    if fresh:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(header, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return open(partial, "a", encoding="utf-8", newline="\n")


def _append(f: IO[str], answered: Answered) -> None:
    """One batch's answers, on disk before the next batch starts."""
    if answered:
        f.write("".join(json.dumps({"question_id": q.question_id, "text": t}, ensure_ascii=False) + "\n"
                        for q, t in answered))
        f.flush()
        os.fsync(f.fileno())


# -- scoring ----------------------------------------------------------------------------------------

def _same_id_types(ids, questions: Mapping, name: str, questions_name: str) -> None:
    hit = id_type_mismatch(ids, questions)
    if hit is not None:
        got, want = hit
        raise DataError(f"question_id types differ: {name} use {got!r} ({type(got).__name__}) where {questions_name} "
                        f"use {want!r} ({type(want).__name__}); ids are compared exactly (1 and \"1\" are different "
                        "ids), so these never match: write them with the same type")


def eval_vqa(questions_path: str, answers_path: str, predictions: Mapping[QuestionId, str],
             predictions_name: str = "the predictions") -> VQAResult:
    """Score the questions that have reference answers with the VQAv2 rule (`answers.vqa_accuracy`:
    its normalisation; 10 references: the leave-one-out mean, else a match with any of them); each
    question's score is in `VQAResult.scores`. Questions without a prediction count as
    wrong (`missing`); predictions for ids that are not questions are not scored (`extra`);
    questions without references and references without a question are counted, not scored.
    Ids of another type than the questions' ("0" for 0), or nothing to score or nothing
    matching at all, raise a `DataError`."""
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
    result = score_vqa(predictions, scored, categories or None)
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


TASKS: dict[str, Callable[..., VQAResult | PopeEvaluation]] = {"vqa": eval_vqa, "pope": eval_pope}


# -- retrieval --------------------------------------------------------------------------------------

RETRIEVAL = "retrieval"


@dataclass(frozen=True)
class RetrievalEvaluation:
    """Recall@K of a model's alignment head on a captions file (`eval_retrieval`)."""

    result: RetrievalResult
    images: tuple[str, ...]  # the gallery, in first-appearance order (paths as the file gives them)
    n_captions: int
    text_max_len: int  # captions are cut to this many tokens, as in training
    n_cut: int  # captions that were cut


def read_captions(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(image, caption, where) per row of a captions file: JSONL (or a JSON list) of
    {"image": path relative to the image root, "caption": text}; an image may have several rows."""
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

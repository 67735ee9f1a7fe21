"""Answering questions with a model: `predict_batches` and `predict_vqa`.

An image's questions are batched together, so the prompt start they share (system prompt and
image tokens) runs once per batch (`Assistant.answer_batch`); answers come back batch by batch.
A question whose image is missing or corrupt, whose `<image>` tags do not match its image, or
whose prompt is too long is a bad question: `on_bad_record="error"` (default) raises a `DataError`
naming it, `"skip"` turns it into an error row {"question_id", "error"} and answers the rest.
Also here: the generation settings of short VQA answers (`VQA_GENERATION`) and of captions
(`CAPTION_GENERATION`), and the prompt template
a question is asked through (`render_prompt`; `QUESTION` asks the text as given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from PIL import Image
from tqdm import tqdm

from vitune.data.processor import load_image
from vitune.data.vqa_format import Question
from vitune.files import DataError
from vitune.inference.assistant import Assistant, Request, user_turn
from vitune.inference.generate import GenerationConfig

# Short answers are what VQA references hold; keep generation bounded.
VQA_GENERATION = GenerationConfig(max_new_tokens=16)
CAPTION_GENERATION = GenerationConfig(max_new_tokens=96)  # a caption is a sentence or a few
BAD_RECORD_POLICIES = ("error", "skip")
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

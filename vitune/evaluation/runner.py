"""Evaluation runners: VQA-style tasks from the LLaVA evaluation format.

`predict_vqa` answers a questions file with a model (batched, with a progress bar) and
`eval_vqa` scores predictions against reference answers, overall and per category.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqdm import tqdm

from vitune.data.processor import load_image
from vitune.data.vqa_format import Question, read_answers, read_questions, write_predictions
from vitune.evaluation.metrics import VQAResult, vqa_exact_match
from vitune.inference.assistant import Assistant, Request, user_turn
from vitune.inference.generate import GenerationConfig

# Short answers are what VQA references hold; keep generation bounded.
VQA_GENERATION = GenerationConfig(max_new_tokens=16)


def predict_vqa(
    assistant: Assistant, questions: list[Question], image_root: Path, batch_size: int = 32,
    gen: GenerationConfig = VQA_GENERATION, progress: bool = True,
) -> list[dict]:
    """Answers in question order. An image's questions are batched together, so the prompt start
    they share (system prompt and image tokens) runs once per batch (`Assistant.answer_batch`)."""
    answers, cache = {}, {}
    with tqdm(total=len(questions), desc="predict", disable=not progress, dynamic_ncols=True) as bar:
        for chunk in _batches(questions, batch_size):
            reqs = [Request([_image(image_root, q, cache)], [user_turn(q.text, 1)]) for q in chunk]
            for q, t in zip(chunk, assistant.answer_batch(reqs, gen)):
                answers[id(q)] = t
            bar.update(len(chunk))
    return [{"question_id": q.question_id, "text": answers[id(q)]} for q in questions]


def _batches(questions: list[Question], batch_size: int) -> list[list[Question]]:
    """Batches of one image's questions where it has several; the other questions batched together."""
    by_image: dict[str, list[Question]] = {}
    for q in questions:
        by_image.setdefault(q.image, []).append(q)
    shared = [g for g in by_image.values() if len(g) > 1]
    singles = [g[0] for g in by_image.values() if len(g) == 1]
    out = [g[i:i + batch_size] for g in shared for i in range(0, len(g), batch_size)]
    return out + [singles[i:i + batch_size] for i in range(0, len(singles), batch_size)]


def _image(root: Path, q: Question, cache: dict):
    if q.image not in cache:
        cache[q.image] = load_image(root / q.image, f"question {q.question_id!r}")
    return cache[q.image]


def run_predict(model_dir: str, questions_path: str, out_path: str, image_root: str | None = None,
                batch_size: int = 32, progress: bool = True, precision: str = "fp32") -> int:
    questions = read_questions(questions_path)
    assistant = Assistant.load(model_dir, precision=precision)
    root = Path(image_root) if image_root else Path(questions_path).parent
    rows = predict_vqa(assistant, questions, root, batch_size, progress=progress)
    return write_predictions(out_path, rows)


def eval_vqa(questions_path: str, answers_path: str, predictions: dict) -> VQAResult:
    questions = read_questions(questions_path)
    categories = {q.question_id: q.category for q in questions if q.category}
    answers = read_answers(answers_path)
    return vqa_exact_match(predictions, answers, categories or None)


TASKS: dict[str, Callable[..., VQAResult]] = {"vqa": eval_vqa}

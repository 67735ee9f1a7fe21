"""Benchmark: VQA evaluation speed of a model folder, three ways, side by side in one process.

- `reference`  : batches of 32 questions in file order, every prompt run in full (the path
                 without prefix sharing; each request gets its own copy of the image);
- `shared`     : `predict_vqa` as shipped: an image's questions in one batch, their common
                 prompt start (system prompt + image tokens) run once (fp32);
- `shared-bf16`: the same under bf16 autocast (`--precision bf16`).

The questions are cut into chunks by image and the three modes take turns on each chunk (rotating
order), so a noisy host slows all of them alike. Prints questions/s, the ratio to `reference`,
the share of answers identical to `reference`'s, and accuracy when `--answers` is given.

    python bench/bench_eval.py --model runs/smol-full/run/model \\
        --questions runs/smol-full/data/test_questions.jsonl \\
        --answers runs/smol-full/data/test_answers.jsonl --n 600
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vitune.data.processor import load_image
from vitune.data.vqa_format import read_answers, read_questions
from vitune.evaluation.answering import VQA_GENERATION, predict_vqa
from vitune.evaluation.metrics import vqa_exact_match
from vitune.inference.assistant import Assistant, Request, user_turn

MODES = ("reference", "shared", "shared-bf16")


def reference_predict(assistant: Assistant, questions, root: Path, batch_size: int = 32) -> list[dict]:
    rows = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        reqs = [Request([load_image(root / q.image)], [user_turn(q.text, 1)]) for q in chunk]  # distinct objects
        rows += [{"question_id": q.question_id, "text": t} for q, t in zip(chunk, assistant.answer_batch(reqs, VQA_GENERATION))]
    return rows


def image_chunks(questions, images_per_chunk: int) -> list[list]:
    order, by_image = [], {}
    for q in questions:
        if q.image not in by_image:
            order.append(q.image)
        by_image.setdefault(q.image, []).append(q)
    return [[q for im in order[i:i + images_per_chunk] for q in by_image[im]]
            for i in range(0, len(order), images_per_chunk)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True), ap.add_argument("--questions", required=True)
    ap.add_argument("--answers"), ap.add_argument("--n", type=int, default=600, help="questions (first N)")
    ap.add_argument("--threads", type=int, default=0), ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = read_questions(args.questions)[: args.n]
    root = Path(args.questions).parent
    fp32, bf16 = Assistant.load(args.model), Assistant.load(args.model, precision="bf16")
    run = {"reference": lambda qs: reference_predict(fp32, qs, root),
           "shared": lambda qs: predict_vqa(fp32, qs, root, progress=False),
           "shared-bf16": lambda qs: predict_vqa(bf16, qs, root, progress=False)}
    run["shared"](questions[:4])  # warm-up
    seconds, preds = dict.fromkeys(MODES, 0.0), {m: {} for m in MODES}
    for k, chunk in enumerate(image_chunks(questions, 8)):
        for mode in MODES[k % 3:] + MODES[:k % 3]:
            t = time.perf_counter()
            rows = run[mode](chunk)
            seconds[mode] += time.perf_counter() - t
            preds[mode].update({r["question_id"]: r["text"] for r in rows})
    answers = None
    if args.answers:
        every = read_answers(args.answers)
        answers = {q.question_id: every[q.question_id] for q in questions}
    result = {"n_questions": len(questions), "threads": torch.get_num_threads(), "modes": {}}
    print(f"{len(questions)} questions, {torch.get_num_threads()} threads")
    print(f"{'mode':<12} {'q/s':>7} {'x ref':>6} {'same as ref':>11} {'accuracy':>9}")
    for m in MODES:
        same = sum(preds[m][q] == preds["reference"][q] for q in preds[m]) / len(preds[m])
        acc = vqa_exact_match(preds[m], answers).accuracy if answers else None
        qps = len(questions) / seconds[m]
        result["modes"][m] = {"seconds": seconds[m], "questions_per_s": qps, "speedup": seconds["reference"] / seconds[m],
                              "same_as_reference": same, "accuracy": acc}
        print(f"{m:<12} {qps:7.2f} {seconds['reference'] / seconds[m]:6.2f} {same:11.1%} "
              f"{'' if acc is None else f'{acc:9.1%}'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

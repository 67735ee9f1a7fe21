"""The main job: generate the shapes data, train the `small` preset through both stages,
evaluate on the held-out split and print the accuracy table per question category.

    vitune quickstart [--out runs/quickstart]
"""

from __future__ import annotations

import time
from pathlib import Path

from vitune.data.builtin.shapes import generate_shapes
from vitune.data.vqa_format import read_predictions, read_questions
from vitune.evaluation.metrics import format_table
from vitune.evaluation.partial import partial_path
from vitune.evaluation.predict import run_predict
from vitune.evaluation.runner import eval_vqa
from vitune.files import atomic_write_json
from vitune.presets import small
from vitune.training.train import train


def quickstart(out: Path, n_train: int = 4000, n_test: int = 500, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    data = out / "data"
    print(f"[1/3] generating shapes data in {data} ({n_train} train / {n_test} test images)")
    # the data set without its relational family (closest / furthest / same): the from-scratch `small`
    # model does not learn those yet (the grounding work, docs/grounding.md), and they would lengthen the run
    generate_shapes(data, n_train=n_train, n_test=n_test, seed=seed, relational=False)
    print("[2/3] training the `small` preset: align (captions) then instruct (QA)")
    # a quickstart starts afresh each time (`overwrite`): it is the one command that may replace a run
    model_dir = train(small(), {"align": str(data / "align.json"), "instruct": str(data / "instruct.json")}, out,
                      overwrite=True).model
    print("[3/3] evaluating on the held-out test split")
    preds = out / "test_predictions.jsonl"
    partial_path(preds).unlink(missing_ok=True)  # answers of an earlier run's model: never resumed
    run_predict(str(model_dir), str(data / "test_questions.jsonl"), str(preds), overwrite=True)
    result = eval_vqa(str(data / "test_questions.jsonl"), str(data / "test_answers.jsonl"), read_predictions(preds))
    minutes = (time.perf_counter() - t0) / 60
    print(format_table(result))
    print(f"quickstart finished in {minutes:.1f} min")
    report = {"minutes": round(minutes, 2), "accuracy": result.accuracy,
              "per_category": {k: v.accuracy for k, v in result.per_category.items()}}
    atomic_write_json(out / "quickstart_results.json", report)
    first = read_questions(data / "test_questions.jsonl")[0]
    print(f"\nchat with the trained model:\n  vitune chat --model {model_dir} --image {data / first.image} "
          f"\"{first.text}\"")
    return report

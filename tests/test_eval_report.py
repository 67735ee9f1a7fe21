"""`vitune eval` end to end into a results folder: predictions, per-question scores, results.json,
report.md and plots; reproducible (twice: the same metrics and predictions); `--predictions`
scored by hand; `--compare` of two runs; POPE on shapes-pope. One tiny untrained model, and the
built-in benches shrunk to 3 images (their registry entries patched) in a private cache."""

import dataclasses
import json

import pytest

from vitune.cli import main
from vitune.evaluation import benches
from vitune.inference.assistant import Assistant

PNG = b"\x89PNG\r\n\x1a\n"
RESULTS_KEYS = {"format", "format_version", "vitune_version", "created", "command", "task", "bench", "data", "model",
                "predictions", "prompt", "decoding", "seed", "metrics", "per_category", "coverage", "resumed",
                "answered_this_run", "predict_time_s", "questions_per_s", "files", "wall_time_s"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tok, one_thread):
    import torch

    from vitune.checkpoints.model_folder import save_pretrained
    from vitune.model.vlm import VLM
    from vitune.presets import tiny
    root = tmp_path_factory.mktemp("eval_report")
    mp = pytest.MonkeyPatch()
    mp.setenv("VITUNE_CACHE", str(root / "cache"))
    small = {"shapes": {"n_test": 3, "seed": 0},
             "shapes-pope": {"n_test": 3, "seed": 0, "n_per_image": 4, "probe_seed": 0},
             "easy-vqa": {"max_test": 2, "seed": 0}}
    for name, params in small.items():
        mp.setitem(benches.BENCHES, name, dataclasses.replace(benches.BENCHES[name], params=params))
    torch.manual_seed(0)
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size))
    model = save_pretrained(VLM(cfg, tok.special.image), tok, root / "model")
    yield root, model
    mp.undo()


def evaluate(*argv):
    return main(["eval", *map(str, argv)])


@pytest.fixture(scope="module")
def runs(env):
    """The same shapes evaluation twice, into two folders."""
    root, model = env
    for name in ("run1", "run2"):
        assert evaluate("--model", model, "--bench", "shapes", "--out", root / name, "--batch-size", 4) == 0
    return root / "run1", root / "run2"


def test_the_results_folder_holds_every_file_and_they_parse(runs, capsys):
    run, _ = runs
    assert {p.name for p in run.iterdir()} == {"predictions.jsonl", "scores.jsonl", "results.json", "report.md",
                                               "per_category.png", "confusion.png"}
    for png in ("per_category.png", "confusion.png"):
        assert (run / png).read_bytes()[:8] == PNG
    preds, scores = read_jsonl(run / "predictions.jsonl"), read_jsonl(run / "scores.jsonl")
    assert len(preds) == len(scores) == 18 and all(set(r) == {"question_id", "text"} for r in preds)
    assert all(set(s) == {"question_id", "category", "score", "answered"} for s in scores)
    r = json.loads((run / "results.json").read_text())
    assert set(r) == RESULTS_KEYS
    assert r["bench"]["name"] == "shapes" and r["task"] == "vqa" and r["prompt"] == "{question}"
    assert len(r["model"]["weights_sha256"]) == 64 and r["model"]["config"]["model"]
    assert len(r["data"]["questions"]["sha256"]) == 64 and len(r["data"]["answers"]["sha256"]) == 64
    assert r["decoding"] == {"strategy": "greedy", "max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0,
                             "seed": 0, "stop_strings": [], "batch_size": 4, "precision": "fp32",
                             "quantize": None}
    assert r["command"].startswith("vitune eval --model ") and "--bench shapes" in r["command"]
    assert r["questions_per_s"] > 0 and r["wall_time_s"] > 0 and r["answered_this_run"] == 18
    m = r["metrics"]
    assert m["n"] == 18 and sum(c["n"] for c in r["per_category"].values()) == m["n"]
    assert m["correct"] == pytest.approx(sum(s["score"] for s in scores))
    for one in [m, *r["per_category"].values()]:
        low, high = one["ci95"]
        assert 0 <= low <= one["accuracy"] <= high <= 1
    assert r["coverage"]["n_missing"] == 0 and r["coverage"]["n_answered"] == 18


def test_report_md_has_the_table_coverage_decoding_and_plots(runs):
    report = (runs[0] / "report.md").read_text()
    assert report.startswith("# Evaluation: shapes\n")
    assert "| category | n | accuracy | 95 % CI |" in report and "| **overall** | 18 |" in report
    assert "greedy, max_new_tokens 16" in report and "- **prompt**: `{question}`" not in report
    assert "## Coverage\n\n- 18 prediction(s) are empty" in report  # the untrained model says nothing
    assert "![per_category](per_category.png)" in report and "![confusion](confusion.png)" in report


def test_running_twice_gives_identical_results(runs):
    a, b = runs
    ra, rb = (json.loads((r / "results.json").read_text()) for r in runs)
    for key in ("metrics", "per_category", "coverage", "model", "data", "prompt", "decoding", "seed"):
        assert ra[key] == rb[key], key
    for name in ("predictions.jsonl", "scores.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_eval_prints_the_table_with_intervals(runs, capsys):
    assert evaluate("--predictions", runs[0] / "predictions.jsonl", "--bench", "shapes") == 0
    out = capsys.readouterr().out
    assert out.startswith("vqa on shapes: ") and "(n=18, 95 % CI" in out
    assert "95 % CI" in out.splitlines()[1] and any(line.startswith("overall ") for line in out.splitlines())


def test_scoring_a_hand_made_predictions_file(tmp_path, capsys):
    q = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "a.png", "text": "colour?", "category": "color"},
        {"question_id": 2, "image": "a.png", "text": "how many?", "category": "count"},
        {"question_id": 3, "image": "b.png", "text": "colour?", "category": "color"},
        {"question_id": 4, "image": "b.png", "text": "how many?", "category": "count"}])
    a = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": 1, "answers": ["red"] * 2 + ["blue"] * 8},  # 2 of 10 annotators: 0.6
        {"question_id": 2, "answer": "2"},
        {"question_id": 3, "answer": "blue"},
        {"question_id": 4, "answer": "3"}])
    p = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "Red."}, {"question_id": 2, "text": "two"},
                                           {"question_id": 3, "text": "green"}, {"question_id": 9, "text": "x"}])
    out = tmp_path / "run"
    assert evaluate("--questions", q, "--answers", a, "--predictions", p, "--out", out) == 0
    printed, err = capsys.readouterr()
    assert "1 question(s) had no prediction and count as wrong: 4" in printed
    assert "warning: the predictions cover only 3 of the 4 scored questions" in err
    r = json.loads((out / "results.json").read_text())
    assert r["metrics"]["accuracy"] == pytest.approx(1.6 / 4) and r["metrics"]["correct"] == pytest.approx(1.6)
    assert r["per_category"]["color"]["accuracy"] == pytest.approx(0.3)
    assert r["per_category"]["count"]["accuracy"] == pytest.approx(0.5)
    assert r["coverage"]["n_missing"] == 1 and r["coverage"]["missing"] == [4] and r["coverage"]["extra"] == [9]
    assert r["model"] is None and r["decoding"] is None and r["prompt"] == "{question}"
    scores = {s["question_id"]: s["score"] for s in read_jsonl(out / "scores.jsonl")}
    assert scores == pytest.approx({1: 0.6, 2: 1.0, 3: 0.0, 4: 0.0})
    assert (out / "per_category.png").read_bytes()[:8] == PNG
    assert read_jsonl(out / "predictions.jsonl") == read_jsonl(p)


def perfect(env, name, tmp_path, max_questions=None):
    """Predictions equal to the bench's first reference answers, scored into a results folder."""
    extra = ("--max-questions", max_questions) if max_questions else ()
    prepared = benches.prepare_bench(name, max_questions)
    preds = write_jsonl(tmp_path / f"{name}-perfect.jsonl", [{"question_id": r["question_id"], "text": r["answer"]}
                                                             for r in read_jsonl(prepared.answers)])
    out = tmp_path / f"{name}-perfect"
    assert evaluate("--predictions", preds, "--bench", name, "--out", out, *extra) == 0
    return out


def test_compare_two_runs_prints_the_table_and_the_significance(env, runs, tmp_path, capsys):
    assert evaluate("--compare", *runs) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["category", "A:"]
    assert any(line.startswith("overall ") and line.count("(n=18, 95 % CI") == 2 for line in out.splitlines())
    assert "difference B - A: +0.0 points on the 18 questions both scored" in out
    assert "significant: no, the difference is within the noise" in out
    best = perfect(env, "shapes", tmp_path)
    capsys.readouterr()
    assert evaluate("--compare", runs[0], best) == 0
    out = capsys.readouterr().out
    assert "significant: yes, the difference is larger than the noise" in out and "McNemar p = " in out


def test_compare_refuses_runs_of_different_benches(env, runs, tmp_path, capsys):
    pope = perfect(env, "shapes-pope", tmp_path)
    capsys.readouterr()
    assert evaluate("--compare", runs[0], pope) == 2
    err = capsys.readouterr().err
    assert "cannot compare" in err and "different benchmarks (shapes vs shapes-pope)" in err
    subset = perfect(env, "shapes", tmp_path, max_questions=5)
    capsys.readouterr()
    assert evaluate("--compare", runs[0], subset) == 2
    err = capsys.readouterr().err
    assert "different bench parameters" in err and "'max_questions': 5" in err
    assert evaluate("--compare", runs[0], tmp_path) == 2
    assert "holds no results.json" in capsys.readouterr().err


def test_max_questions_is_recorded(env, tmp_path):
    out = perfect(env, "shapes", tmp_path, max_questions=5)
    r = json.loads((out / "results.json").read_text())
    assert r["bench"]["params"]["max_questions"] == 5 and r["data"]["questions"]["n"] == 5
    assert r["metrics"]["n"] == 5 and r["metrics"]["accuracy"] == 1.0 and r["coverage"]["n_unused_answers"] == 0


def test_pope_on_shapes_pope_gives_its_metrics(env, tmp_path, capsys):
    _, model = env
    out = tmp_path / "pope"
    assert evaluate("--model", model, "--bench", "shapes-pope", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and "yes-ratio" in printed and "unparseable" in printed
    r = json.loads((out / "results.json").read_text())
    assert r["task"] == "pope" and set(r["per_category"]) == {"random", "popular", "adversarial"}
    for m in [r["metrics"], *r["per_category"].values()]:
        assert {"accuracy", "precision", "recall", "f1", "yes_ratio", "n_unparseable", "ci95", "n"} <= set(m)
    assert sum(m["n"] for m in r["per_category"].values()) == r["metrics"]["n"] == 3 * 3 * 4
    assert (out / "confusion.png").read_bytes()[:8] == PNG  # yes / no: a closed vocabulary
    best = json.loads((perfect(env, "shapes-pope", tmp_path) / "results.json").read_text())["metrics"]
    assert (best["accuracy"], best["precision"], best["recall"], best["f1"], best["yes_ratio"]) == (1, 1, 1, 1, 0.5)
    assert "| precision | recall | F1 | yes-ratio | unparseable |" in (out / "report.md").read_text()


def test_easy_vqa_bench(env, tmp_path):
    pytest.importorskip("easy_vqa")
    r = json.loads((perfect(env, "easy-vqa", tmp_path) / "results.json").read_text())
    assert r["metrics"]["accuracy"] == 1.0 and set(r["per_category"]) <= {"shape", "color", "yes/no"}


def test_the_out_folder_is_checked_before_any_work(env, runs, tmp_path, capsys, monkeypatch):
    _, model = env

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(Assistant, "load", refuse)
    assert evaluate("--model", model, "--bench", "shapes") == 2
    assert "give --out RUN_DIR" in capsys.readouterr().err
    (tmp_path / "mine.txt").write_text("mine")
    assert evaluate("--model", model, "--bench", "shapes", "--out", tmp_path) == 2
    assert "exists and is not empty (it holds mine.txt); pass --overwrite" in capsys.readouterr().err
    assert evaluate("--model", model, "--bench", "shapes", "--out", model / "eval") == 2
    assert "lies inside) the model folder" in capsys.readouterr().err
    assert evaluate("--predictions", runs[0] / "predictions.jsonl", "--bench", "shapes", "--out", runs[0],
                    "--overwrite") == 2
    assert "is (or contains) the predictions file" in capsys.readouterr().err
    assert evaluate("--model", model, "--bench", "shapes", "--task", "pope", "--out", tmp_path / "x") == 2
    assert "bench shapes is a vqa task; --task pope does not apply" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "mine" and not (tmp_path / "x").exists()


def test_overwrite_replaces_the_results_and_an_interrupted_run_resumes(env, tmp_path, capsys, monkeypatch):
    _, model = env
    out = tmp_path / "run"
    calls = {"n": 0}
    original = Assistant.answer_batch

    def answer_batch(self, reqs, gen, on_text=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, reqs, gen, on_text)
    monkeypatch.setattr(Assistant, "answer_batch", answer_batch)
    argv = ("--model", model, "--bench", "shapes", "--out", out, "--batch-size", 6)
    assert evaluate(*argv) == 130
    assert [p.name for p in out.iterdir()] == ["predictions.jsonl.partial"]
    assert evaluate(*argv) == 0  # the folder holds only the partial answers: resumed, no --overwrite needed
    assert "resuming: 6 of 18 answers kept" in capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())
    assert (r["resumed"], r["answered_this_run"], r["metrics"]["n"]) == (6, 12, 18)
    assert evaluate(*argv) == 2
    assert evaluate(*argv, "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["resumed"] == 0

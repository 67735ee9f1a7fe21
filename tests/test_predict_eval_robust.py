"""`vitune predict`, `eval` and `chat` on bad input, interrupted runs and unsafe output paths:
bad questions skipped into OUT.errors.jsonl or named, answers streamed to OUT.partial and resumed,
--out checked before any work, eval coverage explicit, chat histories trimmed, bad generation
values refused. One tiny (untrained, seeded) model folder serves the whole module."""

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image

from vitune.cli import main
from vitune.evaluation.partial import partial_path
from vitune.evaluation.predict import errors_path
from vitune.inference.assistant import Assistant
from vitune.inference.generate import GenerationConfig

IMAGES = {0: "a.png", 1: "a.png", 2: "b.png", 3: "c.png", 4: "d.png", 5: "d.png"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tok, one_thread):
    import torch

    from vitune.checkpoints.model_folder import save_pretrained
    from vitune.model.vlm import VLM
    from vitune.presets import tiny
    root = tmp_path_factory.mktemp("robust")
    torch.manual_seed(0)
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size))
    model = save_pretrained(VLM(cfg, tok.special.image), tok, root / "model")
    rng = np.random.default_rng(0)
    for name in sorted(set(IMAGES.values())):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / name)
    questions = write_jsonl(root / "q.jsonl", [{"question_id": i, "image": im, "text": f"what is {i}?",
                                                "category": "odd" if i % 2 else "even"} for i, im in IMAGES.items()])
    answers = write_jsonl(root / "a.jsonl", [{"question_id": i, "answer": "red"} for i in IMAGES])
    return root, model, questions, answers


def predict(env, out, *extra):
    _, model, questions, _ = env
    return main(["predict", "--model", str(model), "--questions", str(questions), "--out", str(out),
                 "--batch-size", "2", *extra])


@pytest.fixture
def count_answers(monkeypatch):
    """Counts the questions the model answers; `fail_on_call=k` raises Ctrl-C at the k-th batch."""
    seen = {"questions": 0, "calls": 0, "fail_on_call": None}
    original = Assistant.answer_batch

    def answer_batch(self, reqs, gen, on_text=None):
        seen["calls"] += 1
        if seen["calls"] == seen["fail_on_call"]:
            raise KeyboardInterrupt
        seen["questions"] += len(reqs)
        return original(self, reqs, gen, on_text)

    monkeypatch.setattr(Assistant, "answer_batch", answer_batch)
    return seen


@pytest.fixture(scope="module")
def full_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "full.jsonl"
    assert predict(env, out) == 0
    return out.read_text()


def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(Assistant, "load", refuse)


# -- predict: bad questions ---------------------------------------------------------------------------

def test_skip_policy_answers_the_rest_and_lists_the_skipped(env, tmp_path, capsys, full_run):
    root = env[0]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    for name in set(IMAGES.values()):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    rows = [{"question_id": i, "image": im, "text": f"what is {i}?"} for i, im in IMAGES.items()]
    rows += [{"question_id": "gone", "image": "nope.png", "text": "?"},
             {"question_id": "broken", "image": "corrupt.png", "text": "?"},
             {"question_id": "long", "image": "a.png", "text": "why " * 200}]
    questions = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(env[1]), "--questions", str(questions), "--out", str(out),
                 "--batch-size", "2", "--on-bad-record", "skip"]) == 0
    said = capsys.readouterr().out
    assert f"wrote 6 predictions to {out}; 3 questions skipped (see {errors_path(out)})" in said
    assert out.read_text() == full_run  # the good questions answered as without the bad ones
    errors = {r["question_id"]: r["error"] for r in map(json.loads, errors_path(out).read_text().splitlines())}
    assert set(errors) == {"gone", "broken", "long"}
    assert "image not found" in errors["gone"] and "corrupt" in errors["broken"]
    assert "exceeds max_seq_len" in errors["long"] and "question 'long'" in errors["long"]
    assert not partial_path(out).exists()


def test_error_policy_names_the_question_and_keeps_the_answers_so_far(env, tmp_path, capsys):
    root, model, _, _ = env
    rows = [{"question_id": i, "image": str(root / im), "text": f"what is {i}?"} for i, im in IMAGES.items()]
    (tmp_path / "e.png").write_bytes((root / "b.png").read_bytes())
    rows.append({"question_id": "long-one", "image": "e.png", "text": "why " * 200})  # the last batch
    questions = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(model), "--questions", str(questions), "--out", str(out),
                 "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "question 'long-one'" in err and "exceeds max_seq_len" in err and "--on-bad-record skip" in err
    assert not out.exists()
    kept = partial_path(out).read_text().splitlines()[1:]  # after the header line
    assert {json.loads(x)["question_id"] for x in kept} == set(IMAGES)  # the batches before the bad one


def test_a_missing_image_stops_before_the_model_loads(env, tmp_path, capsys, monkeypatch):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": "q7", "image": "nope.png", "text": "?"}])
    no_model_load(monkeypatch)
    assert predict(env, tmp_path / "p.jsonl", "--questions", str(questions)) == 2
    assert "question 'q7': image not found" in capsys.readouterr().err


# -- predict: streaming and resuming ----------------------------------------------------------------

def test_an_interrupted_predict_resumes_where_it_stopped(env, tmp_path, capsys, count_answers, full_run):
    out = tmp_path / "p.jsonl"
    count_answers["fail_on_call"] = 2
    assert predict(env, out) == 130
    lines = partial_path(out).read_text().splitlines()
    assert len(lines) == 3 and not out.exists()  # the header and the first batch (two answers)
    with open(partial_path(out), "a") as f:
        f.write('{"question_id": 4, "te')  # a line cut short by the kill
    count_answers.update(fail_on_call=None, questions=0)
    capsys.readouterr()
    assert predict(env, out) == 0
    assert "resuming: 2 of 6 answers kept" in capsys.readouterr().err
    assert count_answers["questions"] == 4  # only the rest answered
    assert out.read_text() == full_run and not partial_path(out).exists()


def test_a_partial_file_of_other_questions_is_refused(env, tmp_path, capsys, count_answers):
    out = tmp_path / "p.jsonl"
    count_answers["fail_on_call"] = 2
    assert predict(env, out) == 130
    text = partial_path(out).read_text()
    partial_path(out).write_text(text.replace('"question_id": 0', '"question_id": 99'))
    capsys.readouterr()
    assert predict(env, out) == 2
    err = capsys.readouterr().err
    assert "question_id 99 is not a question" in err and f"delete {partial_path(out)}" in err


# -- predict: the output path -----------------------------------------------------------------------

def test_out_that_is_an_input_or_a_folder_is_refused_before_any_work(env, tmp_path, capsys, monkeypatch):
    questions = env[2]
    before = questions.read_text()
    no_model_load(monkeypatch)
    assert predict(env, questions) == 2
    assert "would overwrite the questions file" in capsys.readouterr().err
    assert questions.read_text() == before
    assert predict(env, tmp_path) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert predict(env, tmp_path / "file" / "p.jsonl") == 2
    assert "is a file" in capsys.readouterr().err


def test_an_existing_out_needs_overwrite(env, tmp_path, capsys, full_run):
    out = tmp_path / "p.jsonl"
    out.write_text("earlier work\n")
    assert predict(env, out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "earlier work\n"
    errors_path(out).write_text('{"question_id": 0, "error": "stale"}\n')
    assert predict(env, out, "--overwrite") == 0
    assert out.read_text() == full_run and not errors_path(out).exists()  # no stale errors file left


@pytest.mark.parametrize("argv, message", [
    (["predict", "--batch-size", "-3"], "argument --batch-size: must be >= 1, got -3"),
    (["predict", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["eval", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["chat", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    (["chat", "--temperature", "nan"], "argument --temperature: must be a finite number >= 0"),
    (["chat", "--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["chat", "--top-p", "0"], r"argument --top-p: must be a finite number in (0, 1]"),
    (["chat", "--top-p", "1.5"], r"argument --top-p: must be a finite number in (0, 1]"),
])
def test_bad_numbers_are_argparse_errors(argv, message, capsys):
    required = {"predict": ["--model", "m", "--questions", "q", "--out", "o"],
                "eval": ["--questions", "q", "--answers", "a"], "chat": ["--model", "m"]}[argv[0]]
    with pytest.raises(SystemExit) as e:
        main([*argv, *required])
    assert e.value.code == 2 and message in capsys.readouterr().err


# -- eval: coverage ---------------------------------------------------------------------------------

def eval_preds(env, preds, tmp_path, *extra):
    _, _, questions, answers = env
    path = write_jsonl(tmp_path / "preds.jsonl", [{"question_id": k, "text": v} for k, v in preds.items()])
    return main(["eval", "--questions", str(questions), "--answers", str(answers), "--predictions", str(path), *extra])


def test_eval_reports_missing_extra_and_empty_predictions(env, tmp_path, capsys):
    run = tmp_path / "run"
    assert eval_preds(env, {0: "red", 1: "Red.", 2: "blue", 3: "", 77: "x", "z": "y"}, tmp_path, "--out", str(run)) == 0
    out, err = capsys.readouterr()
    assert "coverage: 4 of 6 scored questions have a prediction" in out
    assert "2 question(s) had no prediction and count as wrong: 4, 5" in out
    assert "2 prediction(s) for ids that are not questions, not scored: 77, 'z'" in out
    assert "1 prediction(s) are empty" in out and "odd" in out and "overall" in out
    assert "warning: the predictions cover only 4 of the 6 scored questions" in err
    r = json.loads((run / "results.json").read_text())
    c = r["coverage"]
    assert (r["metrics"]["n"], r["metrics"]["correct"], c["n_missing"], c["missing"], c["n_extra"], c["extra"],
            c["n_empty"]) == (6, 2, 2, [4, 5], 2, [77, "z"], 1)
    assert {k: r["per_category"]["even"][k] for k in ("n", "correct")} == {"n": 3, "correct": 1}


def test_eval_does_not_score_questions_without_references(env, tmp_path, capsys):
    _, _, questions, _ = env
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "answer": "red"} for i in (0, 1, 2)] +
                          [{"question_id": "orphan", "answer": "red"}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"question_id": i, "text": "red"} for i in IMAGES])
    assert main(["eval", "--questions", str(questions), "--answers", str(answers), "--predictions", str(preds)]) == 0
    out, err = capsys.readouterr()
    assert "3 question(s) have no reference answer, not scored" in out
    assert "1 reference answer(s) are for ids that are not questions" in out
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("overall")] == [["overall", "3", "100.0%"]]
    assert "warning" not in err


@pytest.mark.parametrize("preds, message", [
    ({str(i): "red" for i in IMAGES}, "question_id types differ: .* use '0' \\(str\\) where the questions .* use 0 \\(int\\)"),
    ({100: "red", 101: "red"}, "none of the 2 predictions in .*preds.jsonl is for a question .* nothing matches"),
    ({}, "holds no predictions"),
])
def test_eval_refuses_predictions_that_match_nothing(env, tmp_path, capsys, preds, message):
    import re
    assert eval_preds(env, preds, tmp_path) == 2
    assert re.search(message, capsys.readouterr().err)


def test_eval_with_a_model_never_writes_into_the_model_folder(env, tmp_path, capsys):
    _, model, questions, answers = env
    before = sorted(p.name for p in model.iterdir())
    argv = ["eval", "--model", str(model), "--questions", str(questions), "--answers", str(answers)]
    assert main(argv) == 2
    assert "never into the model folder: give --out RUN_DIR" in capsys.readouterr().err
    assert main([*argv, "--out", str(model / "eval")]) == 2
    assert "lies inside) the model folder" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in model.iterdir()) == before
    preds = tmp_path / "run" / "predictions.jsonl"
    assert len(preds.read_text().splitlines()) == len(IMAGES)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["n"] == len(IMAGES)
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2  # its results are not overwritten
    assert "exists and is not empty" in capsys.readouterr().err


# -- chat -------------------------------------------------------------------------------------------

def test_interactive_chat_drops_the_oldest_exchanges_and_keeps_the_image(env, monkeypatch, capsys):
    root, model, _, _ = env
    lines = iter(["describe the picture " * 3] * 6 + ["x" * 600, "", "and now?"])
    n_image = []
    original = Assistant.prompt_ids

    def prompt_ids(self, req, max_new_tokens):
        ids = original(self, req, max_new_tokens)
        n_image.append((ids.count(self.tok.special.image), len(req.messages)))
        return ids

    monkeypatch.setattr(Assistant, "prompt_ids", prompt_ids)

    def no_more(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", no_more)
    assert main(["chat", "--model", str(model), "--image", str(root / "a.png"), "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "dropped its oldest" in err and "the image stays" in err
    assert "exceeds max_seq_len" in err and "the conversation goes on" in err  # the 600-char message
    tokens = {n for n, _ in n_image}
    assert len(tokens) == 1 and tokens.pop() > 0  # every prompt holds the image
    turns = [m for _, m in n_image]
    assert len(turns) == 7  # every question but the too long one answered
    assert turns[0] == 1 and 1 < max(turns) < 11  # the history grew, and was cut (6 questions uncut: 11 turns)


def test_chat_refuses_bad_values_before_loading_the_model(env, monkeypatch, capsys):
    no_model_load(monkeypatch)
    from types import SimpleNamespace

    from vitune.cli import cmd_chat
    args = SimpleNamespace(model="m", image=[], question=["hi"], max_new_tokens=4, temperature=math.nan,
                           top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        cmd_chat(args)


@pytest.mark.parametrize("kw, field", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": -0.1}, "temperature"), ({"top_p": math.nan}, "top_p"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"stop_strings": ("ok", "")}, "stop_strings"), ({"stop_strings": "stop"}, "stop_strings"),
])
def test_generation_config_names_the_bad_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        GenerationConfig(**kw)
    GenerationConfig(temperature=0.7, top_p=1.0, stop_strings=("\n",))  # good values pass

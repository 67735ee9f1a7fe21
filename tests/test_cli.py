"""End to end through the real `vitune` entry point: data -> train -> resume -> predict -> eval."""

import json

import pytest

from vitune.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, out = root / "data", root / "run"
    assert main(["data", "shapes", "--out", str(data), "--n-train", "24", "--n-test", "4", "--seed", "3"]) == 0
    train = ["train", "--preset", "tiny", "--data", f"align={data / 'align.json'}",
             "--data", f"instruct={data / 'instruct.json'}", "--out", str(out),
             "train.stages.0.steps=2", "train.stages.1.steps=3"]
    assert main(train + ["--stop-after", "3"]) == 0
    assert (out / "state" / "trainer.json").is_file() and not (out / "model").exists()
    assert main(train + ["--resume"]) == 0
    return data, out


def test_training_writes_a_model_folder_and_a_full_log(run):
    _, out = run
    assert {p.name for p in (out / "model").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    steps = [json.loads(line)["global_step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_predict_then_eval(run, capsys):
    data, out = run
    preds = out / "preds.jsonl"
    assert main(["predict", "--model", str(out), "--questions", str(data / "test_questions.jsonl"), "--out", str(preds)]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    n_questions = len((data / "test_questions.jsonl").read_text().splitlines())
    assert len(rows) == n_questions and all(set(r) == {"question_id", "text"} for r in rows)
    capsys.readouterr()
    scores = out / "scores.json"
    assert main(["eval", "--task", "vqa", "--questions", str(data / "test_questions.jsonl"),
                 "--answers", str(data / "test_answers.jsonl"), "--predictions", str(preds), "--out", str(scores)]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "spatial" in table
    assert json.loads(scores.read_text())["n"] == n_questions


def test_chat_one_shot_streams_an_answer(run, capsys):
    data, out = run
    image = sorted((data / "images").glob("test_*.png"))[0]
    assert main(["chat", "--model", str(out / "model"), "--image", str(image), "--max-new-tokens", "5", "What", "color?"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_data_inspect_shows_masking(run, capsys):
    data, _ = run
    assert main(["data", "inspect", str(data / "instruct.json"), "--index", "1", "--preset", "tiny", "--no-color"]) == 0
    shown = capsys.readouterr().out
    assert "<image x16>" in shown and "[[" in shown and "trained" in shown


def test_errors_are_reported_not_raised(run, tmp_path, capsys):
    data, _ = run
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "x1", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}]')
    assert main(["train", "--preset", "tiny", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "record 'x1'" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--data", str(bad), "--out", str(tmp_path / "o"), "model.lm.layerz=2"]) == 2
    assert "layerz" in capsys.readouterr().err
    assert main(["eval", "--questions", str(data / "test_questions.jsonl"), "--answers", str(data / "test_answers.jsonl")]) == 2

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
    results = out / "eval"
    assert main(["eval", "--task", "vqa", "--questions", str(data / "test_questions.jsonl"),
                 "--answers", str(data / "test_answers.jsonl"), "--predictions", str(preds), "--out", str(results)]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "spatial" in table
    assert json.loads((results / "results.json").read_text())["metrics"]["n"] == n_questions


def test_batched_predictions_with_shared_prefixes_equal_one_by_one(run):
    data, out = run
    q = str(data / "test_questions.jsonl")
    assert main(["predict", "--model", str(out), "--questions", q, "--out", str(out / "one.jsonl"), "--batch-size", "1"]) == 0
    assert main(["predict", "--model", str(out), "--questions", q, "--out", str(out / "many.jsonl")]) == 0
    one, many = (out / "one.jsonl").read_text(), (out / "many.jsonl").read_text()
    assert one == many and len(one.splitlines()) == len(open(q).read().splitlines())


def test_shared_prefix_needs_the_same_image_objects(tok):
    from PIL import Image

    from vitune.data.chat import Message
    from vitune.inference.assistant import Request, shared_prefix_len
    a, b = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4))
    img = tok.special.image
    prompts = [[1, img, img, 7, 8, 9], [1, img, img, 7, 5]]
    same = [Request([a], [Message("user", "q")]), Request([a], [Message("user", "r")])]
    assert shared_prefix_len(prompts, same, img) == 4
    assert shared_prefix_len(prompts, [same[0], Request([b], same[1].messages)], img) == 0
    assert shared_prefix_len([[1, img, 7], [1, 5, img, 7]], same, img) == 0  # an image token after the split


def test_eval_with_a_model_in_bf16(run, capsys, monkeypatch):
    import torch

    from vitune.model.lm import LM
    data, out = run
    dtypes = []
    original = LM.logits

    def logits(self, h):  # records whether a matmul here runs under bf16 autocast
        x = h.reshape(-1, h.shape[-1])[:1]
        dtypes.append(torch.mm(x, x.T).dtype)
        return original(self, h)

    monkeypatch.setattr(LM, "logits", logits)
    assert main(["eval", "--model", str(out), "--questions", str(data / "test_questions.jsonl"), "--answers",
                 str(data / "test_answers.jsonl"), "--precision", "bf16", "--out", str(out / "eval16")]) == 0
    assert "overall" in capsys.readouterr().out
    assert dtypes and set(dtypes) == {torch.bfloat16}  # matmuls ran under bf16 autocast


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

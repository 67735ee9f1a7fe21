"""`vitune quantize` and `--quantize 8|4` on chat / predict / eval, through the real entry point:
the folder it writes answers as the model quantised on load does, eval records the scheme, an
interrupted prediction is not resumed with another scheme's answers, and bad uses are refused."""

import json

import pytest
from test_quant import tiny_vlm

from vitune.checkpoints.model_folder import save_pretrained
from vitune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("quant_cli")
    src = save_pretrained(tiny_vlm(tok), tok, root / "float")
    import numpy as np
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "a.png")
    questions = root / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": "a.png", "text": t}) + "\n"
                                 for i, t in enumerate(["hello", "What colour is it?", "a b c d"])))
    return root, src, questions


def run(*argv):
    return main([*map(str, argv)])


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quantize_writes_a_folder_that_answers_as_quantising_on_load(folders, capsys):
    root, src, questions = folders
    assert run("quantize", src, root / "int8", "--bits", 8) == 0
    assert "quantised model saved to" in capsys.readouterr().out
    assert run("predict", "--model", root / "int8", "--questions", questions, "--out", root / "a.jsonl") == 0
    assert run("predict", "--model", src, "--quantize", 8, "--questions", questions, "--out", root / "b.jsonl") == 0
    assert read(root / "a.jsonl") == read(root / "b.jsonl")
    assert run("chat", "--model", root / "int8", "--max-new-tokens", 4, "hello") == 0
    assert run("quantize", src, root / "int8", "--bits", 8) == 2  # exists: --overwrite needed
    assert "--overwrite" in capsys.readouterr().err


def test_quantize_refuses_what_it_cannot_do(folders, capsys):
    root, src, _ = folders
    assert run("quantize", src, root / "x", "--bits", 8, "--group-size", 32) == 2
    assert "group_size applies to bits=4 only" in capsys.readouterr().err
    assert not (root / "x").exists()
    with pytest.raises(SystemExit) as e:  # argparse: not a choice
        run("quantize", src, root / "y", "--bits", 3)
    assert e.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err
    assert run("quantize", src, root / "int4", "--bits", 4) == 0
    assert run("chat", "--model", root / "int4", "--quantize", 8, "hello") == 2
    assert "is quantised already (int4" in capsys.readouterr().err


def test_eval_records_the_scheme_and_a_partial_is_not_resumed_across_schemes(folders, tmp_path):
    root, src, questions = folders
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "answer": "x"}) + "\n" for i in range(3)))
    out = tmp_path / "run"
    assert run("eval", "--model", src, "--quantize", 4, "--questions", questions, "--answers", answers,
               "--out", out) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["decoding"]["quantize"] == "int4" and "--quantize 4" in r["command"]
    from pathlib import Path

    from vitune.evaluation.partial import partial_header
    h4 = partial_header(str(questions), Path(src), "{question}", "int4")
    assert h4 != partial_header(str(questions), Path(src), "{question}", "int8")
    assert "quantize" not in partial_header(str(questions), Path(src), "{question}")

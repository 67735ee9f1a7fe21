"""`vitune eval` tasks beside VQA: multiple choice (`--task choice`, the bench shapes-choice) and
captioning (`--task caption`, the bench shapes-captions or a captions file). Hand-made prediction
files are scored to numbers worked out by hand; one tiny untrained model runs each end to end,
twice for reproducibility. Benches are shrunk to 3 images in a private cache."""

import dataclasses
import json
import string

import pytest

from vitune.cli import main
from vitune.evaluation import benches
from vitune.evaluation.choice import CHOICE_INSTRUCTION, answer_letters, make_choice_questions


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def evaluate(*argv):
    return main(["eval", *map(str, argv)])


@pytest.fixture(scope="module")
def env(tmp_path_factory, tok, one_thread):
    import torch

    from vitune.checkpoints.model_folder import save_pretrained
    from vitune.model.vlm import VLM
    from vitune.presets import tiny
    root = tmp_path_factory.mktemp("eval_tasks")
    mp = pytest.MonkeyPatch()
    mp.setenv("VITUNE_CACHE", str(root / "cache"))
    small = {"shapes-choice": {"n_test": 3, "seed": 0, "n_options": 4, "choice_seed": 0},
             "shapes-captions": {"n_test": 3, "seed": 0}}
    for name, params in small.items():
        mp.setitem(benches.BENCHES, name, dataclasses.replace(benches.BENCHES[name], params=params))
    torch.manual_seed(0)
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size))
    model = save_pretrained(VLM(cfg, tok.special.image), tok, root / "model")
    yield root, model
    mp.undo()


# -- multiple choice ------------------------------------------------------------------------------

QUESTIONS = [{"question_id": i, "image": "a.png", "text": t, "category": c} for i, (t, c) in enumerate(
    [("colour?", "color"), ("colour?", "color"), ("colour?", "color"), ("there?", "yes/no"), ("there?", "yes/no")])]
ANSWERS = {0: "red", 1: "blue", 2: "green", 3: "yes", 4: "no"}


def test_make_choice_questions_offers_the_answer_among_its_categorys_answers():
    qs, keys = make_choice_questions(QUESTIONS, ANSWERS, n_options=4, seed=0)
    assert [k["question_id"] for k in keys] == [0, 1, 2, 3, 4]
    for q, k, original in zip(qs, keys, QUESTIONS):
        lines = q["text"].split("\n")
        assert lines[0] == original["text"] and lines[-1] == CHOICE_INSTRUCTION
        options = {line[0]: line[3:] for line in lines[1:-1]}
        assert "".join(options) == string.ascii_uppercase[:len(options)]
        assert options[k["answer"]] == ANSWERS[q["question_id"]]  # the key names the answer
        pool = {"red", "blue", "green"} if q["category"] == "color" else {"yes", "no"}
        assert set(options.values()) == pool and len(options) == len(pool)  # 3 colours: 3 options; yes/no: 2
        assert {x: q[x] for x in ("question_id", "image", "category")} == \
            {x: original[x] for x in ("question_id", "image", "category")}
    assert make_choice_questions(QUESTIONS, ANSWERS, 4, 0) == (qs, keys)  # seeded
    orders = {tuple(make_choice_questions(QUESTIONS, ANSWERS, 4, s)[1][0]["answer"] for s in range(20))}
    assert len(set(next(iter(orders)))) > 1  # the answer's position moves with the seed
    with pytest.raises(ValueError, match="category 'x' has only one answer"):
        make_choice_questions([{"question_id": 0, "image": "a", "text": "q", "category": "x"}], {0: "a"})


def test_answer_letters():
    assert answer_letters({1: ["B"], 2: ["a"]}) == "ABCD"
    assert answer_letters({1: ["F"]}) == "ABCDEF"
    with pytest.raises(ValueError, match="question_id 2: .* one option letter"):
        answer_letters({1: ["A"], 2: ["red"]})


def test_choice_scores_letters_and_lists_the_unparseable(tmp_path, capsys):
    q = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": i, "image": "a.png", "text": "?", "category": "c1" if i < 3 else "c2"} for i in range(5)])
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "answer": k} for i, k in enumerate("ABCDA")])
    p = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": 0, "text": "(A) a red circle"},  # right
        {"question_id": 1, "text": "b"},  # right: a lone letter in any case
        {"question_id": 2, "text": "a dog"},  # unparseable: "a" is an article, not option A
        {"question_id": 3, "text": "The answer is C."},  # wrong letter
    ])  # 4: missing
    out = tmp_path / "run"
    assert evaluate("--task", "choice", "--questions", q, "--answers", a, "--predictions", p, "--out", out) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("choice on ") and "(n=5, 95 % CI" in printed
    assert "1 answer(s) name no single option letter (ABCD) and count as wrong: 2" in printed
    r = json.loads((out / "results.json").read_text())
    m = r["metrics"]
    assert (m["n"], m["correct"], m["accuracy"]) == (5, 2, 0.4)
    assert m["n_unparseable"] == 1 and m["unparseable"] == [2] and m["letters"] == "ABCD"
    assert r["per_category"]["c1"]["n_unparseable"] == 1 and r["per_category"]["c2"]["n_unparseable"] == 0
    assert r["per_category"]["c1"]["correct"] == 2 and r["coverage"]["missing"] == [4]
    scores = {s["question_id"]: s["score"] for s in read_jsonl(out / "scores.jsonl")}
    assert scores == {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0}
    report = (out / "report.md").read_text()
    assert "| unparseable |" in report and "1 answer(s) name no single option letter (ABCD)" in report
    assert (out / "confusion.png").is_file()  # letters A-D are a closed vocabulary


def test_choice_refuses_an_answer_key_that_is_not_a_letter(tmp_path, capsys):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "a.png", "text": "?"}])
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "answer": "red"}])
    p = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 0, "text": "A"}])
    assert evaluate("--task", "choice", "--questions", q, "--answers", a, "--predictions", p) == 2
    err = capsys.readouterr().err
    assert f"{a}: not a multiple-choice answers file" in err and "question_id 0" in err and "'red'" in err


def test_shapes_choice_with_a_model_runs_and_repeats(env, capsys):
    root, model = env
    for name in ("c1", "c2"):
        assert evaluate("--model", model, "--bench", "shapes-choice", "--out", root / name, "--batch-size", 4) == 0
    r1, r2 = (json.loads((root / n / "results.json").read_text()) for n in ("c1", "c2"))
    assert r1["task"] == "choice" and r1["metrics"]["n"] == 18 and r1["bench"]["name"] == "shapes-choice"
    assert r1["metrics"] == r2["metrics"] and r1["per_category"] == r2["per_category"]
    q = read_jsonl(benches.prepare_bench("shapes-choice").questions)
    assert all(x["text"].endswith(CHOICE_INSTRUCTION) and "\nA. " in x["text"] for x in q)
    # an untrained model names no letter: every answer is unparseable, each counted wrong and listed
    assert r1["metrics"]["n_unparseable"] + r1["metrics"]["correct"] <= 18


# -- captioning -----------------------------------------------------------------------------------

java = pytest.importorskip("pycocoevalcap", reason="caption metrics need vitune[eval]")


def need_java():
    import shutil
    if shutil.which("java") is None:
        pytest.skip("caption metrics need Java (apt-get install default-jre-headless); scripts/setup.sh installs it")


def test_caption_scores_a_hand_made_predictions_file(tmp_path, capsys):
    need_java()
    c = write_jsonl(tmp_path / "captions.jsonl", [
        {"image": "a.png", "caption": "a red circle"}, {"image": "a.png", "caption": "one red circle"},
        {"image": "b.png", "caption": "a blue square"}, {"image": "c.png", "caption": "nothing at all"}])
    p = write_jsonl(tmp_path / "p.jsonl", [{"question_id": "a.png", "text": "a red circle"},
                                           {"question_id": "b.png", "text": "a blue square"},
                                           {"question_id": "z.png", "text": "extra"}])
    out = tmp_path / "run"
    assert evaluate("--task", "caption", "--captions", c, "--predictions", p, "--out", out) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"caption on {c}: 3 images, 4 reference captions")
    assert "1 of 3 images have no caption and are scored as an empty one: 'c.png'" in printed
    assert "1 prediction(s) for ids that are no image of the captions file, not scored: 'z.png'" in printed
    r = json.loads((out / "results.json").read_text())
    m = r["metrics"]
    assert set(m) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "n"} and m["n"] == 3
    # ROUGE-L: a and b match a reference exactly (1.0 each), c is empty (0): the mean is 2/3
    assert m["ROUGE-L"] == pytest.approx(2 / 3)
    # BLEU-1: 6 predicted words all match; the reference lengths closest to them are 3 + 3 + 3 (c has no
    # prediction: length 0 against its 3), so the brevity penalty is exp(1 - 9/6)
    import math
    assert m["BLEU-1"] == pytest.approx(math.exp(1 - 9 / 6), rel=1e-6)
    assert r["coverage"]["missing"] == ["c.png"] and r["coverage"]["extra"] == ["z.png"]
    assert r["task"] == "caption" and r["model"] is None and r["prompt"] == "Describe the image."
    report = (out / "report.md").read_text()
    assert "| n | BLEU-1 |" in report and "- 1 of 3 images have no caption" in report
    assert evaluate("--compare", out, out) == 2
    assert "a caption run" in capsys.readouterr().err


def test_caption_with_a_model_on_shapes_captions_runs_and_repeats(env, capsys):
    need_java()
    root, model = env
    for name in ("k1", "k2"):
        assert evaluate("--model", model, "--bench", "shapes-captions", "--out", root / name, "--batch-size", 2) == 0
    r1, r2 = (json.loads((root / n / "results.json").read_text()) for n in ("k1", "k2"))
    assert r1["metrics"] == r2["metrics"] and r1["metrics"]["n"] == 3 and r1["data"]["captions"]["n"] == 6
    assert r1["prompt"] == "Describe the image." and r1["decoding"]["max_new_tokens"] == 96
    assert {p.name for p in (root / "k1").iterdir()} == {"caption_questions.jsonl", "predictions.jsonl",
                                                         "results.json", "report.md"}
    asked = read_jsonl(root / "k1" / "caption_questions.jsonl")
    assert [q["text"] for q in asked] == ["Describe the image."] * 3 and len({q["image"] for q in asked}) == 3
    assert [p["question_id"] for p in read_jsonl(root / "k1" / "predictions.jsonl")] == [q["image"] for q in asked]
    assert (root / "k1" / "predictions.jsonl").read_bytes() == (root / "k2" / "predictions.jsonl").read_bytes()


def test_caption_prompt_is_recorded_and_only_for_captions(env, tmp_path, capsys):
    need_java()
    root, model = env
    out = tmp_path / "k"
    assert evaluate("--model", model, "--bench", "shapes-captions", "--max-questions", 2, "--caption-prompt",
                    "Write a caption.", "--out", out) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["prompt"] == "Write a caption." and r["metrics"]["n"] == 2 and "--caption-prompt" in r["command"]
    assert evaluate("--model", model, "--bench", "shapes-choice", "--caption-prompt", "x", "--out", tmp_path / "z") == 2
    assert "--caption-prompt is the instruction of --task caption, not of --task choice" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_captions_file_with_questions_is_refused(tmp_path, capsys):
    c = write_jsonl(tmp_path / "c.jsonl", [{"image": "a.png", "caption": "x"}])
    assert evaluate("--task", "vqa", "--captions", c, "--predictions", c) == 2
    assert "--captions is the input of --task retrieval or caption, not of --task vqa" in capsys.readouterr().err

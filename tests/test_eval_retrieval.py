"""`vitune eval` retrieval: the shapes-retrieval bench (shrunk to a few test images in a private
cache), Recall@K of a tiny dual encoder trained briefly on shapes, checked against the same
ranking computed by hand from the model's embeddings of training-encoded captions; the results
folder; reproducibility; a user captions file; the refusals (no alignment head, --predictions,
--max-questions, --compare)."""

import dataclasses
import json

import pytest
import torch

from vitune.checkpoints.model_folder import load_pretrained
from vitune.cli import main
from vitune.config import apply_overrides
from vitune.data.builtin.shapes_scene import Scene, SceneObject, caption, object_caption
from vitune.data.chat import Message
from vitune.data.processor import (
    ImageTransform,
    encode_caption,
    load_image,
    pad_instructions,
)
from vitune.data.tokenizer import IMAGE_SLOT
from vitune.evaluation import benches
from vitune.evaluation.results import sha256
from vitune.evaluation.retrieval import recall_at_k
from vitune.evaluation.runner import eval_retrieval
from vitune.files import DataError
from vitune.presets import tiny
from vitune.training.train import train

N_TEST = 12
DUAL = ["model.contrastive.dim=16", "model.contrastive.text.dim=32", "model.contrastive.text.heads=2",
        "model.contrastive.text.ffn_dim=64", "train.stages.0.steps=12", "train.stages.0.batch_size=8",
        "train.stages.0.lm_weight=0", "train.stages.0.contrastive_weight=1",
        "train.stages.0.train=[vision,contrastive]", "train.stages.1.steps=1"]


def evaluate(*argv):
    return main(["eval", *map(str, argv)])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory, shapes_dir, one_thread):
    root = tmp_path_factory.mktemp("eval_retrieval")
    mp = pytest.MonkeyPatch()
    mp.setenv("VITUNE_CACHE", str(root / "cache"))
    mp.setitem(benches.BENCHES, "shapes-retrieval",
               dataclasses.replace(benches.BENCHES["shapes-retrieval"], params={"n_test": N_TEST, "seed": 0}))
    data = {"align": str(shapes_dir / "align.json"), "instruct": str(shapes_dir / "instruct.json")}
    dual = train(apply_overrides(tiny(), DUAL), data, root / "dual", progress=False, log=lambda s: None).model
    plain = train(apply_overrides(tiny(), ["train.stages.0.steps=1", "train.stages.1.steps=1"]), data, root / "plain",
                  progress=False, log=lambda s: None).model
    yield root, dual, plain
    mp.undo()


@pytest.fixture(scope="module")
def runs(env):
    root, dual, _ = env
    for name in ("run1", "run2"):
        assert evaluate("--model", dual, "--bench", "shapes-retrieval", "--out", root / name, "--batch-size", 5) == 0
    return root / "run1", root / "run2"


def bench_folder():
    return benches.prepare_bench("shapes-retrieval").folder


def test_the_bench_holds_two_captions_per_test_image_from_its_scene(env):
    folder = bench_folder()
    rows = read_jsonl(folder / "captions.jsonl")
    scenes = [r for r in read_jsonl(folder / "scenes.jsonl") if r["split"] == "test"]
    assert len(scenes) == N_TEST and len(rows) == 2 * N_TEST
    assert all(set(r) == {"image", "caption"} and (folder / r["image"]).is_file() for r in rows)
    for k, s in enumerate(scenes):
        scene = Scene(tuple(SceneObject(**o) for o in s["objects"]), 96)
        assert rows[2 * k] == {"image": s["image"], "caption": caption(scene)}
        assert rows[2 * k + 1] == {"image": s["image"], "caption": object_caption(scene)}
    assert not (folder / "questions.jsonl").exists()


def test_object_caption_names_each_object_and_its_cell():
    scene = Scene((SceneObject("red", "circle", "small", 1, 0, 0), SceneObject("blue", "square", "large", 8, 0, 0)), 96)
    assert object_caption(scene) == "A small red circle at the top and a large blue square at the bottom right."


def test_results_folder_holds_recall_at_k_with_its_ns(runs, capsys):
    run, _ = runs
    assert {p.name for p in run.iterdir()} == {"results.json", "report.md"}
    r = json.loads((run / "results.json").read_text())
    assert r["format"] == "vitune-eval-results" and r["task"] == "retrieval" and r["bench"]["name"] == "shapes-retrieval"
    m = r["metrics"]
    assert (m["n_images"], m["n_captions"], m["n_i2t"], m["n_t2i"]) == (N_TEST, 2 * N_TEST, N_TEST, 2 * N_TEST)
    for direction in ("i2t", "t2i"):
        recall = m[direction]
        assert list(recall) == ["R@1", "R@5", "R@10"]
        assert 0 <= recall["R@1"] <= recall["R@5"] <= recall["R@10"] <= 1
    assert r["protocol"]["captions_per_image"] == 2 and r["protocol"]["similarity"] == "cosine"
    assert len(r["model"]["weights_sha256"]) == 64 and r["model"]["config"]["model"]["contrastive"]["dim"] == 16
    captions = bench_folder() / "captions.jsonl"
    assert r["data"]["captions"] == {"path": str(captions.resolve()), "sha256": sha256(captions), "n": 2 * N_TEST}
    assert r["embedding"]["batch_size"] == 5 and r["embedding"]["text_max_len"] == 64
    assert "--bench shapes-retrieval" in r["command"] and r["files"] == {"report": "report.md"}
    report = (run / "report.md").read_text()
    assert report.startswith("# Evaluation: shapes-retrieval\n") and "| direction | n | R@1 | R@5 | R@10 |" in report
    assert f"| image → text | {N_TEST} | {100 * m['i2t']['R@1']:.1f} % |" in report
    assert f"| text → image | {2 * N_TEST} | {100 * m['t2i']['R@1']:.1f} % |" in report


def test_running_twice_gives_the_same_numbers(runs):
    a, b = (json.loads((r / "results.json").read_text()) for r in runs)
    for key in ("metrics", "protocol", "data", "model", "embedding"):
        assert a[key] == b[key], key


def test_recall_equals_the_ranking_of_training_encoded_embeddings(env, runs):
    """The numbers eval writes are recall_at_k of the model's own embeddings: images through the
    vision transform, captions encoded as the alignment stage encodes them, padded with eos."""
    _, dual, _ = env
    folder = bench_folder()
    rows = read_jsonl(folder / "captions.jsonl")
    model, tok = load_pretrained(dual)
    images = list(dict.fromkeys(r["image"] for r in rows))
    max_len = model.cfg.contrastive.text.max_len
    ids = [encode_caption(tok, [Message("user", IMAGE_SLOT), Message("assistant", r["caption"])], max_len, "r",
                          lambda s: None) for r in rows]
    with torch.no_grad():
        v = model.embed_images(ImageTransform.for_vision(model.cfg.vision)([load_image(folder / i) for i in images]))
        z = model.embed_texts(*pad_instructions(ids, tok.special.eos))
    want = recall_at_k(v, z, [images.index(r["image"]) for r in rows])
    got = json.loads((runs[0] / "results.json").read_text())["metrics"]
    assert got["i2t"] == {f"R@{k}": x for k, x in want.i2t.items()}
    assert got["t2i"] == {f"R@{k}": x for k, x in want.t2i.items()}
    assert want.t2i[10] > 0  # a real ranking: identical embeddings (all ties) score 0 at every K


def test_a_user_captions_file(env, tmp_path):
    _, dual, _ = env
    folder = bench_folder()
    rows = read_jsonl(folder / "captions.jsonl")[:6:2]  # 3 images, one caption each
    captions = tmp_path / "mine.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert evaluate("--model", dual, "--captions", captions, "--image-root", folder, "--out", out) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["bench"] is None and r["task"] == "retrieval" and "--captions" in r["command"]
    assert (r["metrics"]["n_images"], r["metrics"]["n_captions"]) == (3, 3)
    assert r["metrics"]["i2t"]["R@5"] == r["metrics"]["t2i"]["R@5"] == 1.0  # 3 candidates: always in the top 5
    assert r["data"]["image_root"] == str(folder.resolve())


def test_a_model_without_an_alignment_head_is_refused(env, tmp_path, capsys):
    _, _, plain = env
    out = tmp_path / "run"
    assert evaluate("--model", plain, "--bench", "shapes-retrieval", "--out", out) == 2
    err = capsys.readouterr().err
    assert "no alignment head" in err and "model.contrastive.dim" in err and str(plain) in err
    assert not (out / "results.json").exists()
    with pytest.raises(DataError, match=r"model\.contrastive\.dim = 0"):
        eval_retrieval(plain, bench_folder() / "captions.jsonl")


@pytest.mark.parametrize("argv, match", [
    (["--predictions", "p.jsonl", "--bench", "shapes-retrieval"], "no predictions to score"),
    (["--model", "M", "--bench", "shapes-retrieval", "--max-questions", "3", "--out", "O"], "--max-questions does not"),
    (["--model", "M", "--task", "retrieval", "--out", "O"], "needs --bench shapes-retrieval or --captions"),
    (["--model", "M", "--task", "retrieval", "--questions", "q", "--answers", "a", "--out", "O"],
     "--captions FILE (JSONL rows {\"image\": PATH, \"caption\": TEXT}), not --questions / --answers"),
    (["--model", "M", "--captions", "c.jsonl", "--task", "vqa", "--out", "O"], "--captions is the input of"),
    (["--model", "M", "--bench", "shapes-retrieval", "--on-bad-record", "skip", "--out", "O"], "change the gallery"),
])
def test_what_retrieval_refuses(env, tmp_path, capsys, argv, match):
    _, dual, _ = env
    fixed = [str(dual) if a == "M" else str(tmp_path / "O") if a == "O" else a for a in argv]
    assert evaluate(*fixed) == 2
    assert match in capsys.readouterr().err


def test_compare_refuses_retrieval_runs(runs, capsys):
    assert evaluate("--compare", *runs) == 2
    assert "a retrieval run" in capsys.readouterr().err

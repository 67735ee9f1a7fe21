"""Training: exact resume, stage plans, learning-rate schedule, saved folders that load, config errors."""

import pytest
import torch

from vitune.checkpoints.model_folder import load_pretrained
from vitune.config import ConfigError, apply_overrides
from vitune.presets import tiny
from vitune.training.metrics_log import read_metrics
from vitune.training.train import build_model, build_tokenizer, lr_factor, train


def data(shapes_dir):
    return {"align": str(shapes_dir / "align.json"), "instruct": str(shapes_dir / "instruct.json")}


def losses(out):
    return [(r["global_step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]


def test_interrupted_and_resumed_run_reproduces_losses(shapes_dir, tmp_path):
    cfg = apply_overrides(tiny(), ["train.stages.0.steps=3", "train.stages.1.steps=4", "train.save_every=2"])
    full = train(cfg, data(shapes_dir), tmp_path / "full", progress=False, log=lambda s: None).model
    # stop mid-way through the second stage (after 5 of 7 steps), then resume
    part = tmp_path / "part"
    train(cfg, data(shapes_dir), part, stop_after=5, progress=False, log=lambda s: None)
    assert len(losses(part)) == 5 and not (part / "model").exists()
    resumed = train(cfg, data(shapes_dir), part, resume=True, progress=False, log=lambda s: None).model
    assert losses(part) == losses(tmp_path / "full")
    a, b = load_pretrained(full)[0].state_dict(), load_pretrained(resumed)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_saved_state_says_so_and_starts_from_the_beginning(shapes_dir, tmp_path):
    logs = []
    cfg = apply_overrides(tiny(), ["train.stages.0.steps=1", "train.stages.1.steps=1"])
    assert train(cfg, data(shapes_dir), tmp_path, resume=True, progress=False, log=logs.append).model
    assert any("no training state saved" in line and "starting from the beginning" in line for line in logs)


def test_stage_trains_only_its_parts(shapes_dir, tmp_path):
    cfg = apply_overrides(tiny(), ["train.stages.0.train=[connector]", "train.stages.0.steps=2",
                                   "train.stages.1.steps=1", "train.stages.1.train=[connector,lm]"])
    tok = build_tokenizer(cfg, ["x"])
    torch.manual_seed(cfg.train.seed)
    before = build_model(cfg, tok).state_dict()
    out = train(cfg, data(shapes_dir), tmp_path, progress=False, log=lambda s: None).model
    after = load_pretrained(out)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("connector."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("lm."))


def test_lr_schedule_warms_up_then_decays():
    stage = tiny().train.stages[0].__class__(warmup_steps=2, min_lr_ratio=0.1)
    f = [lr_factor(s, 10, stage) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(f[2:], f[3:])) and f[-1] > 0.1


def test_bad_overrides_name_the_field():
    with pytest.raises(ConfigError, match="unknown field 'lerning_rate'"):
        apply_overrides(tiny(), ["train.stages.0.lerning_rate=1"])
    with pytest.raises(ConfigError, match=r"train.stages.0.template.*'jinja' is not one of"):
        apply_overrides(tiny(), ["train.stages.0.template=jinja"])
    with pytest.raises(ConfigError, match="model.lm.layers: expected int"):
        apply_overrides(tiny(), ["model.lm.layers=two"])
    with pytest.raises(ConfigError, match="lr_lm: expected a number, got 'fast'"):
        apply_overrides(tiny(), ["train.stages.0.lr_lm=fast"])
    assert apply_overrides(tiny(), ["train.stages.0.lr_lm=3e-4"]).train.stages[0].lr_lm == 3e-4
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(tiny(), ["train.stages.5.steps=1"])


def test_packed_stage_trains_on_fewer_rows(shapes_dir, tmp_path):
    cfg = apply_overrides(tiny(), ["train.stages.0.steps=1", "train.stages.1.steps=2",
                                   "train.stages.1.packing=shared_prefix", "model.lm.max_seq_len=400"])
    logs = []
    train(cfg, data(shapes_dir), tmp_path, progress=False, log=logs.append)
    packed = [line for line in logs if "packed into" in line]
    assert len(packed) == 1
    n_samples, n_rows = (int(w) for w in packed[0].split(":")[1].split() if w.isdigit())
    assert 0 < n_rows < n_samples
    assert all(r["loss"] == r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl"))  # finite, not NaN

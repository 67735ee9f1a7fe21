"""No lost work, no silent nonsense in training: an OUT holding a run is never overwritten by
accident, a resume checks it fits, a non-finite step stops the run before it is applied, Ctrl-C
and SIGTERM save the state, a kill mid-save is undone, and a NaN model is never saved or loaded."""

import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitune.checkpoints.model_folder import load_pretrained, save_pretrained
from vitune.checkpoints.training_state import read_position
from vitune.config import ConfigError, apply_overrides
from vitune.data.tokenizer import byte_level
from vitune.files import DataError, atomic_dir, recover_dir
from vitune.presets import tiny
from vitune.training import train as train_module
from vitune.training.guard import Interrupted, SaveClock, TrainingError
from vitune.training.metrics_log import read_metrics
from vitune.training.train import build_model, train

QUIET = {"progress": False, "log": lambda s: None}


def data(shapes_dir):
    return {"align": str(shapes_dir / "align.json"), "instruct": str(shapes_dir / "instruct.json")}


def cfg(*extra):
    return apply_overrides(tiny(), ["train.stages.0.steps=2", "train.stages.1.steps=3", *extra])


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def full_run(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return train(cfg(), data(shapes_dir), out, **QUIET)


def test_an_earlier_run_is_not_overwritten_without_asking(shapes_dir, full_run):
    out = full_run.model.parent
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"holds an earlier run \(config.yaml, metrics.jsonl, state, model\).*--overwrite"):
        train(cfg(), data(shapes_dir), out, **QUIET)
    assert (out / "metrics.jsonl").read_text() == before and (out / "model" / "config.json").is_file()
    with pytest.raises(ConfigError, match="give one of them"):
        train(cfg(), data(shapes_dir), out, resume=True, overwrite=True, **QUIET)


def test_overwrite_starts_afresh(shapes_dir, tmp_path):
    train(cfg("train.stages.1.steps=1"), data(shapes_dir), tmp_path, **QUIET)
    (tmp_path / "notes.txt").write_text("mine")
    train(cfg(), data(shapes_dir), tmp_path, overwrite=True, **QUIET)
    assert [r["global_step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only vitune's own files are removed


def test_resume_names_every_changed_field_and_data(shapes_dir, tmp_path):
    train(cfg(), data(shapes_dir), tmp_path, stop_after=2, **QUIET)
    changed = cfg("train.stages.1.lr_lm=0.5", "model.lm.layers=3")
    with pytest.raises(ConfigError, match=r"(?s)model\.lm\.layers: 2 -> 3.*train\.stages\.1\.lr_lm: 0\.001 -> 0\.5"):
        train(changed, data(shapes_dir), tmp_path, resume=True, **QUIET)
    other = {**data(shapes_dir), "instruct": data(shapes_dir)["align"]}
    with pytest.raises(ConfigError, match="data of stage 'instruct': not the data the run was trained on"):
        train(cfg(), other, tmp_path, resume=True, **QUIET)
    assert read_position(tmp_path / "state").global_step == 2  # refused before any work
    # what does not change the computation may differ; an explicit override allows the rest
    logs = []
    train(cfg("train.threads=1", "train.save_every=7"), data(shapes_dir), tmp_path, resume=True, stop_after=3,
          progress=False, log=logs.append)
    assert not any("resuming with a change" in line for line in logs)
    train(cfg("train.stages.1.lr_lm=0.002"), data(shapes_dir), tmp_path, resume=True, allow_config_change=True,
          progress=False, log=logs.append)
    assert any("resuming with a change" in line and "lr_lm" in line for line in logs)


def test_a_non_finite_step_stops_the_run_before_it_is_applied(shapes_dir, tmp_path, monkeypatch):
    real = train_module.stage_loss
    calls = {"n": 0}

    def poisoned(model, b, stage, n_targets, n_micro):
        calls["n"] += 1
        loss, nce = real(model, b, stage, n_targets, n_micro)
        return (loss * float("nan"), nce) if calls["n"] == 4 else (loss, nce)

    monkeypatch.setattr(train_module, "stage_loss", poisoned)
    with pytest.raises(TrainingError, match=r"stage 'instruct' step 2 \(global step 4\): loss nan.*not applied"):
        train(cfg(), data(shapes_dir), tmp_path, **QUIET)
    assert read_position(tmp_path / "state").global_step == 3
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "state").values())
    monkeypatch.setattr(train_module, "stage_loss", real)
    done = train(cfg(), data(shapes_dir), tmp_path, resume=True, **QUIET)
    assert [r["global_step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert done.model is not None


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_state_and_resume_finishes_exactly(shapes_dir, tmp_path, monkeypatch, full_run, sig, code):
    real = train_module.train_step
    calls = {"n": 0}

    def step_then_signal(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(train_module, "train_step", step_then_signal)
    with pytest.raises(Interrupted, match="state after global step 3 is saved") as e:
        train(cfg(), data(shapes_dir), tmp_path, **QUIET)
    assert e.value.exit_code == code
    assert signal.getsignal(sig) is not None and read_position(tmp_path / "state").global_step == 3
    monkeypatch.setattr(train_module, "train_step", real)
    resumed = train(cfg(), data(shapes_dir), tmp_path, resume=True, **QUIET)
    assert same_weights(resumed.model, full_run.model)


def test_save_clock_by_steps_and_by_time():
    now = [0.0]
    clock = SaveClock(every_steps=3, every_minutes=1.0, clock=lambda: now[0])
    assert [s for s in range(1, 8) if clock.due(s)] == [3, 6]
    now[0] = 61.0
    assert clock.due(1)
    clock.saved()
    assert not clock.due(1)
    assert not SaveClock(0, 0).due(5)


def test_periodic_saves_are_on_by_default(shapes_dir, tmp_path):
    assert tiny().train.save_every_minutes == 10.0
    train(cfg("train.save_every_minutes=0.0001"), data(shapes_dir), tmp_path, stop_after=2, **QUIET)
    assert read_position(tmp_path / "state").global_step == 2


def test_a_kill_between_the_two_renames_is_undone(tmp_path):
    target = tmp_path / "state"
    with atomic_dir(target) as t:
        (t / "a.txt").write_text("first")
    os.replace(target, tmp_path / ".state.old")  # what the swap of a second save had done when killed
    dead = tmp_path / ".state.vitune-999999999-x.tmp"
    dead.mkdir()
    (tmp_path / ".metrics.jsonl.vitune-999999999-z.tmp").write_text("half")
    live = tmp_path / f".state.vitune-{os.getpid()}-y.tmp"
    live.mkdir()
    recover_dir(target)
    assert (target / "a.txt").read_text() == "first"
    assert not dead.exists() and live.exists()
    with atomic_dir(target) as t:  # the next save replaces it and leaves nothing behind
        (t / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "state"])


def test_resume_recovers_a_state_left_mid_swap(shapes_dir, tmp_path, full_run):
    train(cfg(), data(shapes_dir), tmp_path, stop_after=3, **QUIET)
    os.replace(tmp_path / "state", tmp_path / ".state.old")
    resumed = train(cfg(), data(shapes_dir), tmp_path, resume=True, **QUIET)
    assert same_weights(resumed.model, full_run.model)


def test_a_model_with_non_finite_weights_is_never_saved_or_loaded(tmp_path):
    tok = byte_level()
    model = build_model(tiny(), tok)
    folder = save_pretrained(model, tok, tmp_path / "m")
    state = weights(folder)
    key = next(k for k in state if k.startswith("lm."))
    state[key][0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(DataError, match=rf"model.safetensors: 1 tensor\(s\) hold NaN.*{key}"):
        load_pretrained(folder)
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    with pytest.raises(DataError, match="refusing to save"):
        save_pretrained(model, tok, tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_training_state_loads_without_unpickling(full_run):
    state = full_run.state
    for name in ("optimizer.pt", "rng.pt"):
        torch.load(state / name, weights_only=True)  # raises if the file needs arbitrary unpickling


def test_stop_after_reports_no_model(shapes_dir, tmp_path):
    result = train(cfg(), data(shapes_dir), tmp_path, stop_after=1, **QUIET)
    assert result.stopped and result.model is None and not (tmp_path / "model").exists()
    assert train(cfg(), data(shapes_dir), tmp_path, resume=True, **QUIET).model == tmp_path / "model"


def test_resume_never_replaces_a_model_it_cannot_continue(shapes_dir, tmp_path):
    import shutil
    train(cfg(), data(shapes_dir), tmp_path, **QUIET)
    shutil.rmtree(tmp_path / "state")
    before = weights(tmp_path / "model")
    with pytest.raises(ConfigError, match="holds a model but no training state"):
        train(cfg(), data(shapes_dir), tmp_path, resume=True, **QUIET)
    assert weights(tmp_path / "model").keys() == before.keys()

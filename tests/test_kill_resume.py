"""Fault test: `vitune train` killed with SIGKILL at random moments (default save settings but
for the interval), each time followed by the same command with `--resume`, finishes with weights
equal bit for bit to an uninterrupted run's, and every resume loads.

The default suite kills 3 times; `pytest -m slow` runs the 20 kills (and SIGINT / SIGTERM) of the
reliability issue. Each kill lands anywhere: during start-up, data loading, a step, or a save.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitune.training.metrics_log import read_metrics

STEPS = ["train.stages.0.steps=6", "train.stages.1.steps=8", "train.save_every_minutes=0.005"]


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitune", "train", "--preset", "tiny", "--data", f"align={data / 'align.json'}",
            "--data", f"instruct={data / 'instruct.json'}", "--out", str(out), "train.threads=1", *STEPS, *extra]


def run(cmd: list[str], kill_after: float | None, sig: int = signal.SIGKILL) -> int:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        p.send_signal(sig)
        p.wait(timeout=120)
    err = p.stderr.read().decode()
    assert "Traceback" not in err and "internal error" not in err, err
    return p.returncode


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run(command(shapes_dir, out), None) == 0
    return out


def interrupted_run(data: Path, out: Path, kills: int, sig: int, seed: int) -> int:
    """Kill `kills` times at random, resuming each time; then let it finish. Returns the kills landed."""
    rng, landed, first = random.Random(seed), 0, True
    while landed < kills:
        code = run(command(data, out, *([] if first else ["--resume"])), rng.uniform(1.0, 6.0), sig)
        first = False
        if code == 0:  # it finished before the kill: start again from scratch for the next one
            run(command(data, out, "--overwrite"), None)
            first = True
            continue
        landed += 1
    assert run(command(data, out, "--resume"), None) == 0
    return landed


def check_equal(out: Path, reference: Path) -> None:
    a, b = weights(out), weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["global_step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 15))
    assert [r["loss"] for r in read_metrics(out / "metrics.jsonl")] == [
        r["loss"] for r in read_metrics(reference / "metrics.jsonl")]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no leftovers of killed saves


def test_three_kills_then_resume_equal_an_uninterrupted_run(shapes_dir, tmp_path, reference):
    interrupted_run(shapes_dir, tmp_path, 3, signal.SIGKILL, seed=0)
    check_equal(tmp_path, reference)


@pytest.mark.slow
def test_twenty_kills(shapes_dir, tmp_path, reference):
    t0 = time.perf_counter()
    assert interrupted_run(shapes_dir, tmp_path, 20, signal.SIGKILL, seed=1) == 20
    check_equal(tmp_path, reference)
    print(f"20 SIGKILLs and resumes in {time.perf_counter() - t0:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_repeated_sigint_and_sigterm(shapes_dir, tmp_path, reference, sig):
    interrupted_run(shapes_dir, tmp_path, 5, sig, seed=2)
    check_equal(tmp_path, reference)

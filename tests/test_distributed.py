"""Distributed training on CPU (gloo), two processes launched by torchrun through the real entry
point (`python -m torch.distributed.run --nproc_per_node 2 -m vitune train ...`), the tiny preset:

- a 2-process DDP run and a 2-process FSDP2 run give the per-step losses of the 1-process run with
  the same global batch, to rtol 1e-5 (measured: ~2e-7; float sums run in another order), and its
  final weights to atol 1e-4 (measured: 1e-5 at most; AdamW turns a rounding difference in a gradient
  near 0 into a weight difference of up to lr = 1e-3 a step, so weights are the looser check);
- a run stopped and resumed with another world size each time (1 -> 2 FSDP -> 2 DDP -> 1) logs the
  uninterrupted run's losses, each step once.

The config is the hard case on purpose: a contrastive stage with gradient accumulation (in-batch
negatives gathered across the processes), then a stage with a frozen tower on data where a third of
the records are text-only, so that some process's share of a batch holds no image at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitune.config import ConfigError, apply_overrides
from vitune.data.dataset import BatchOrder
from vitune.presets import tiny
from vitune.training.distributed import World, check
from vitune.training.metrics_log import read_metrics
from vitune.training.train import train

RTOL = 1e-5  # per-step losses, 2 processes against 1 (weights: atol 1e-4, see above)
OVERRIDES = ["train.threads=1", "train.group_by_length=false",
             "model.contrastive.dim=16", "model.contrastive.text.dim=32", "model.contrastive.text.heads=2",
             "model.contrastive.text.ffn_dim=64", "train.stages.0.contrastive_weight=0.5",
             "train.stages.0.train=[vision,connector,lm,contrastive]", "train.stages.0.grad_accum=2",
             "train.stages.1.train=[connector,lm]"]
STEPS = 8  # 4 per stage (the tiny preset's)


@pytest.fixture(scope="module")
def data(shapes_dir, tmp_path_factory) -> dict[str, str]:
    """The shapes captions, and its chats with a text-only record after every second one."""
    folder = tmp_path_factory.mktemp("mixed")
    recs, mixed = json.loads((shapes_dir / "instruct.json").read_text())[:48], []
    for i, r in enumerate(recs):
        mixed.append(r)
        if i % 2 == 0:
            n = i % 7 + 2
            mixed.append({"id": f"text-{i}", "conversations": [
                {"from": "human", "value": f"Count to {n}."},
                {"from": "gpt", "value": " ".join(str(k) for k in range(1, n + 1))}]})
    (folder / "mixed.json").write_text(json.dumps(mixed))
    return {"align": str(shapes_dir / "align.json"), "instruct": str(folder / "mixed.json"),
            "image_root": str(shapes_dir)}


def quiet_train(data: dict[str, str], out: Path, *extra: str, **kwargs):
    cfg = apply_overrides(tiny(), [*OVERRIDES, *extra])
    return train(cfg, {"align": data["align"], "instruct": data["instruct"]}, out, image_root=data["image_root"],
                 progress=False, log=lambda s: None, **kwargs)


def torchrun(data: dict[str, str], out: Path, options: tuple[str, ...] = (), *extra: str) -> str:
    """A 2-process `vitune train` with command-line `options` and `extra` overrides; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitune", "train", "--preset", "tiny", "--data", f"align={data['align']}",
           "--data", f"instruct={data['instruct']}", "--image-root", data["image_root"], "--out", str(out),
           *options, *OVERRIDES, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in p.stderr.splitlines() if "rror" in line and not line.startswith("warning: record")]
    assert p.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + p.stderr[-2000:]
    return p.stdout


def losses(out: Path) -> list[float]:
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["global_step"] for r in rows] == list(range(1, STEPS + 1))  # each step once: process 0 alone logs
    return [r["loss"] for r in rows]


def assert_losses(out: Path, reference: Path) -> None:
    got, want = losses(out), losses(reference)
    assert got == pytest.approx(want, rel=RTOL), list(zip(got, want))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    quiet_train(data, out)
    return out


def test_some_process_gets_a_share_without_images(data):
    """What the FSDP run below must survive: a process whose rows of a batch hold no image."""
    recs = json.loads(Path(data["instruct"]).read_text())
    has_image = ["image" in r for r in recs]
    order = BatchOrder([1] * len(recs), tiny().train.stages[1].batch_size, seed=1, group_by_length=False)
    shares = [World(r, 2).share(order.indices(k)) for k in range(4) for r in range(2)]
    assert any(not any(has_image[i] for i in s) for s in shares)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_equal_one(data, reference, tmp_path, kind):
    stdout = torchrun(data, tmp_path, (), f"train.distributed={kind}")
    assert_losses(tmp_path, reference)
    a, b = (load_file(str(out / "model" / "model.safetensors")) for out in (tmp_path, reference))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
    assert stdout.count("model saved to") == 1
    state = {p.name for p in (tmp_path / "state").iterdir()}
    assert {"dcp", "rng.pt", "rng_rank1.pt", "trainer.json"} <= state and "model.safetensors" not in state


def test_stop_and_resume_with_other_world_sizes(data, reference, tmp_path):
    quiet_train(data, tmp_path, stop_after=2)                                      # 1 process, stage 0
    torchrun(data, tmp_path, ("--resume", "--stop-after", "5"), "train.distributed=fsdp")  # into stage 1
    assert (tmp_path / "state" / "dcp" / ".metadata").is_file()
    torchrun(data, tmp_path, ("--resume", "--stop-after", "7"))                   # DDP
    done = quiet_train(data, tmp_path, resume=True)                                # 1 process again
    assert done.model is not None and (tmp_path / "state" / "model.safetensors").is_file()
    assert_losses(tmp_path, reference)


def test_fsdp_in_one_process_says_how_to_launch(data, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.distributed=fsdp .* single process: launch with `torchrun"):
        quiet_train(data, tmp_path, "train.distributed=fsdp")
    assert not (tmp_path / "state").exists()


def test_a_batch_the_processes_cannot_share_evenly_is_refused_before_any_work():
    cfg = tiny()  # batch_size 4
    check(cfg, World(0, 2))
    check(cfg, World(0, 4))
    with pytest.raises(ConfigError, match=r"train\.stages\.0\.batch_size: .* 4 rows, which 3 processes cannot "
                       r"share evenly: set train\.stages\.0\.batch_size to a multiple of 3 \(e\.g\. 3 or 6\)"):
        check(cfg, World(0, 3))


def test_shares_are_disjoint_and_make_up_the_batch():
    rows = [7, 3, 11, 5, 2, 9]
    for size in (1, 2, 3, 6):
        shares = [World(r, size).share(rows) for r in range(size)]
        assert sorted(i for s in shares for i in s) == sorted(rows) and all(len(s) == len(rows) // size for s in shares)


def test_the_config_field_is_checked():
    assert apply_overrides(tiny(), ["train.distributed=fsdp"]).train.distributed == "fsdp"
    with pytest.raises(ConfigError, match=r"train\.distributed: 'zero' is not one of \['ddp', 'fsdp'\]"):
        apply_overrides(tiny(), ["train.distributed=zero"])
    with pytest.raises(ConfigError, match=r"train\.distributed=fsdp runs on cuda \(nccl\) or cpu \(gloo\)"):
        apply_overrides(tiny(), ["train.distributed=fsdp", "train.device=mps"])

"""Benchmark: what the periodic training-state saves cost, for the `small` preset.

Measured on the machine it runs on, in one process:

- `step`: the median time of one `small` training step (instruct stage, shapes data, as the
  quickstart trains it);
- `save`: the median time of one `save_state` (model, optimizer, RNG, tokenizer, config: written,
  fsynced and swapped in atomically);
- the overhead of periodic saves, save / (interval + save), at the default interval
  (`train.save_every_minutes` = 10) and at tighter ones;
- side by side: the same run (`--steps` steps) with no periodic save and with a save every
  `--every` steps, in turn (`--rounds` times), and the ratio of their wall times.

    python bench/bench_save.py                 # ~2-3 minutes on 2 vCPUs
    python bench/bench_save.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vitune.checkpoints.training_state import Position, save_state
from vitune.config import TrainConfig, apply_overrides
from vitune.data.builtin.shapes import generate_shapes
from vitune.presets import small
from vitune.training.train import train


def timed_run(cfg, data: dict[str, str], out: Path) -> float:
    t0 = time.perf_counter()
    train(cfg, data, out, progress=False, log=lambda s: None, overwrite=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10, help="save every N steps in the side-by-side run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vitune-bench-save-"))
    try:
        generate_shapes(root / "data", n_train=400, n_test=10, seed=0)
        data = {"align": str(root / "data" / "align.json"), "instruct": str(root / "data" / "instruct.json")}
        base = apply_overrides(small(), ["train.stages.0.steps=1", f"train.stages.1.steps={args.steps}",
                                         "train.save_every_minutes=0"])
        periodic = apply_overrides(base, [f"train.save_every={args.every}"])
        timed_run(base, data, root / "warmup")
        plain, saving = [], []
        for _ in range(args.rounds):  # in turn, so a noisy host slows both alike
            plain.append(timed_run(base, data, root / "plain"))
            saving.append(timed_run(periodic, data, root / "saving"))
        step = statistics.median(plain) / (args.steps + 1)
        result = {"steps": args.steps, "every": args.every, "plain_s": plain, "saving_s": saving}
        result.update(save_times(root, base))
        save = result["save_s"]
        minutes = TrainConfig().save_every_minutes
        result["step_s"] = step
        result["overhead_default"] = save / (minutes * 60 + save)
        result["overhead_1min"] = save / (60 + save)
        result["ratio_side_by_side"] = statistics.median(saving) / statistics.median(plain)
        report(result, minutes)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def save_times(root: Path, cfg) -> dict:
    """Median of 5 `save_state` calls of the trained `small` run (its model, optimizer, tokenizer)."""
    from vitune.checkpoints.model_folder import load_pretrained
    from vitune.training.train import build_optimizer
    model, tok = load_pretrained(root / "plain" / "model")
    optimizer = build_optimizer(model, cfg.train.stages[1], cfg.train)
    for g in optimizer.param_groups:  # one step on zero gradients: the AdamW moments a real state holds
        for param in g["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        save_state(root / "state", model, optimizer, Position(1, i, i), tok, cfg)
        times.append(time.perf_counter() - t0)
    size = sum(p.stat().st_size for p in (root / "state").iterdir())
    return {"save_s": statistics.median(times), "state_bytes": size}


def report(r: dict, minutes: float) -> None:
    print(f"small: one step {r['step_s'] * 1000:.0f} ms; one state save {r['save_s'] * 1000:.0f} ms "
          f"({r['state_bytes'] / 1e6:.1f} MB)")
    print(f"overhead of periodic saves: every {minutes:g} min (default) {100 * r['overhead_default']:.3f} %, "
          f"every 1 min {100 * r['overhead_1min']:.2f} %")
    print(f"side by side, {r['steps']} steps: no periodic save {statistics.median(r['plain_s']):.1f} s, "
          f"a save every {r['every']} steps {statistics.median(r['saving_s']):.1f} s: ratio {r['ratio_side_by_side']:.3f}")


if __name__ == "__main__":
    main()

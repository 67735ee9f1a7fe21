"""Benchmark: one `smol` LoRA training step (bf16 autocast) by micro-batch shape: time and peak RSS.

Each configuration runs in a fresh subprocess (peak RSS = the process's `ru_maxrss`), builds the
`smol` model (EfficientNet-Lite0 + SmolLM2-135M-Instruct with LoRA; needs `vitune convert
smollm2` once), and times forward + backward of B rows of T tokens (49 image tokens after a
20-token start; targets after position 80). `packed` rows carry segment ids (a 20-token question
every 20 tokens after position 80), so attention goes through the segment mask; `causal` rows are
the same shapes with the plain causal path. Prints the median of the timed steps after one warm-up.

    python bench/bench_smol_step.py                       # packed 4x370 / causal 4x370 / packed 1,2,4 x300
    python bench/bench_smol_step.py --config packed:2:300 --steps 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

DEFAULT = ("packed:4:370", "causal:4:370", "packed:1:300", "packed:2:300", "packed:4:300")


def run_one(mode: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    import torch

    from vitune.checkpoints.pretrained import build_vlm, pretrained_tokenizer
    from vitune.presets import smol
    torch.set_num_threads(threads)
    cfg = smol().model
    tok = pretrained_tokenizer(cfg)
    model = build_vlm(cfg, tok.special.image)
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name or name.startswith("connector"))
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (batch, seq), generator=g)
    ids[:, 20:69] = tok.special.image
    labels = ids.clone()
    labels[:, :80] = -100
    pixels = torch.randn(batch, 3, 224, 224, generator=g)
    segments = None
    if mode == "packed":
        segments = torch.zeros(batch, seq, dtype=torch.long)
        segments[:, 80:] = 1 + torch.arange(seq - 80) // 20
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(ids, labels, pixels, segments=segments)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"mode": mode, "batch": batch, "seq": seq, "step_s": statistics.median(times[1:]),
            "tokens_per_s": batch * seq / statistics.median(times[1:]), "model_loaded_mib": loaded,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", help="MODE:BATCH:SEQ (packed|causal); repeatable")
    ap.add_argument("--steps", type=int, default=3), ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS), ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        mode, b, t = args.child.split(":")
        print(json.dumps(run_one(mode, int(b), int(t), args.steps, args.threads)))
        return
    rows = []
    print(f"{'mode':<7} {'B':>2} {'T':>4} {'step s':>7} {'tok/s':>6} {'model MiB':>9} {'peak MiB':>8}")
    for c in args.config or DEFAULT:
        out = subprocess.run([sys.executable, __file__, "--child", c, "--steps", str(args.steps),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['mode']:<7} {r['batch']:>2} {r['seq']:>4} {r['step_s']:7.2f} {r['tokens_per_s']:6.0f} "
              f"{r['model_loaded_mib']:9.0f} {r['peak_mib']:8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

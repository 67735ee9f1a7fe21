"""Benchmark: vitune's `small` model against the same architecture built from `transformers`.

What it measures, on the CPU it runs on, in one process with A/B alternation:

- training step time (AdamW, batch 32, fp32 and bf16 autocast) -> samples/s, tokens/s and the
  ratio vitune / transformers, for
    * `vitune-36`: vitune `small` with `connector.reduce="none"` (36 image tokens): the same
      architecture as transformers' LLaVA, so the fair ratio;
    * `vitune-9` : vitune `small` as shipped (`pool2x2`, 9 image tokens), same images and text;
    * `hf-36`    : `LlavaForConditionalGeneration` (CLIP vision + Llama, sdpa attention);
- greedy decoding of 32 new tokens at batch 1 and 8, fp32 and bf16 weights -> new tokens/s
  (prefill included); vitune in its fused inference form (model/fuse.py) as `vitune chat` loads
  it, and again with its decode step compiled (`-compiled`, GenerationConfig(compile=True); the
  compile happens in an untimed first call);
- memory of a training run, each model in fresh subprocesses (RSS high-water mark, VmHWM), and the
  tensors saved for backward;
- how vitune's step time grows with image tokens (9 / 36 / 144) and with sequence length
  (T = 32 / 64 / 128 / 256).

Each sample is `[image tokens][text]`; the loss is on the second half of the text. The main
comparison uses 28 text tokens, so T = 36 + 28 = 64 for the 36-token models (37 for `vitune-9`).
Every figure is the median over repeated timed steps after >= 3 warm-up steps; the models are
timed in turn (rotating order) so that a noisy host slows all of them alike.

    python bench/bench_train.py --quick            # smoke run, ~1-2 minutes
    python bench/bench_train.py --json bench.json  # full run, <~10 minutes on 2 vCPUs
    python bench/bench_train.py --threads 1        # torch.set_num_threads(1)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from vitune.config import ModelConfig
from vitune.presets import small

VOCAB = 512
IMAGE_ID = VOCAB - 1
BATCH = 32
TEXT_LEN = 28            # text tokens per sample in the main comparison (T = 36 + 28 = 64)
PROMPT_TEXT = 12         # decode prompt: [image tokens][12 text tokens]
NEW_TOKENS = 32

Impl = Literal["vitune", "hf"]
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class Spec:
    """One model to time: which implementation, its vitune config, and the text per sample."""

    name: str
    impl: Impl
    cfg: ModelConfig              # transformers' model is built from it too (`hf_config`)
    text_len: int = TEXT_LEN
    compile: bool = False         # decoding only: the torch.compile'd step (GenerationConfig.compile)

    @property
    def image_tokens(self) -> int:
        v = self.cfg.vision
        n = (v.image_size // v.patch_size) ** 2
        return n if self.cfg.connector.reduce == "none" else n // 4

    @property
    def seq_len(self) -> int:
        return self.image_tokens + self.text_len


# ---------------------------------------------------------------- models

def small_cfg(reduce: str = "pool2x2", image_size: int = 96, max_len: int = 160) -> ModelConfig:
    """vitune's `small` model config with vocab 512 and the given token reduction / image size."""
    cfg = small().model
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, image_size=image_size),
        connector=dataclasses.replace(cfg.connector, reduce=reduce),
        lm=dataclasses.replace(cfg.lm, vocab_size=VOCAB, max_seq_len=max(max_len, cfg.lm.max_seq_len)),
    )


def llava_like(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without vitune-only extras that transformers' LLaVA lacks (`connector.slot_embedding`)."""
    if getattr(cfg.connector, "slot_embedding", False):
        cfg = dataclasses.replace(cfg, connector=dataclasses.replace(cfg.connector, slot_embedding=False))
    return cfg


def hf_config(cfg: ModelConfig):
    """The `LlavaConfig` of the same architecture as a vitune config (which must not pool)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    v, lm = cfg.vision, cfg.lm
    if cfg.connector.reduce != "none" or v.kind != "vit" or not v.class_token or cfg != llava_like(cfg):
        raise ValueError("transformers' LLaVA has a CLIP ViT with a class token, no token reduction, no slot embedding")
    vision = CLIPVisionConfig(
        hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads,
        intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=v.act, layer_norm_eps=v.norm_eps,
    )
    text = LlamaConfig(
        vocab_size=lm.vocab_size, hidden_size=lm.dim, num_hidden_layers=lm.layers,
        num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads, intermediate_size=lm.ffn_dim,
        rms_norm_eps=lm.norm_eps, max_position_embeddings=max(lm.max_seq_len, 512),
        tie_word_embeddings=lm.tie_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
        image_seq_length=(v.image_size // v.patch_size) ** 2, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=lm.tie_embeddings, attn_implementation="sdpa",
    )


def build(spec: Spec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if spec.impl == "vitune":
        from vitune.model.vlm import VLM
        return VLM(spec.cfg, image_token_id=IMAGE_ID)
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration(hf_config(spec.cfg))
    attn = {model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation}
    if attn != {"sdpa"}:
        raise RuntimeError(f"expected sdpa attention, got {attn}")
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- data

def make_batch(spec: Spec, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`[image tokens][text]` per row; labels on the second half of the text, -100 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    n_img, size = spec.image_tokens, spec.cfg.vision.image_size
    text = torch.randint(3, IMAGE_ID, (batch, spec.text_len), generator=g)
    ids = torch.cat([torch.full((batch, n_img), IMAGE_ID), text], dim=1)  # (B, T)
    labels = torch.full_like(ids, -100)
    first_target = n_img + spec.text_len // 2
    labels[:, first_target:] = ids[:, first_target:]
    pixels = torch.randn(batch, 3, size, size, generator=g)  # (B, 3, H, W)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def loss_of(spec: Spec, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if spec.impl == "vitune":
        loss, _ = model(batch["input_ids"], batch["labels"], batch["pixel_values"])
        return loss
    return model(**batch).loss


# ---------------------------------------------------------------- timing

def autocast(precision: Precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def make_trainer(spec: Spec, precision: Precision, batch: int) -> tuple[torch.nn.Module, Callable[[], float]]:
    """A model and a closure running one AdamW step of it on a fixed batch (returning the loss)."""
    model = build(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = make_batch(spec, batch)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(precision):
            loss = loss_of(spec, model, data)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return model, step


def alternate(runs: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Warm every run up, then time one call of each in turn, `reps` rounds, rotating the order."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    names, times = list(runs), {name: [] for name in runs}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(ts: list[float]) -> dict:
    """Median and min seconds, and spread = (max - min) / median: how noisy the timed calls were."""
    med = statistics.median(ts)
    return {"s": med, "min_s": min(ts), "spread": (max(ts) - min(ts)) / med, "n": len(ts)}


def time_training(specs: list[Spec], precision: Precision, batch: int, warmup: int, reps: int) -> list[dict]:
    runs = {s.name: make_trainer(s, precision, batch)[1] for s in specs}
    times = alternate(runs, warmup, reps)
    rows = []
    for s in specs:
        st = summary(times[s.name])
        rows.append({"model": s.name, "precision": precision, "batch": batch, "image_tokens": s.image_tokens,
                     "T": s.seq_len, **st, "step_ms": 1000 * st["s"], "min_ms": 1000 * st["min_s"],
                     "samples_per_s": batch / st["s"], "tokens_per_s": batch * s.seq_len / st["s"]})
    return rows


def make_decoder(spec: Spec, precision: Precision, batch: int, new_tokens: int) -> Callable[[], int]:
    """A closure generating `new_tokens` greedy tokens for `batch` equal-length prompts."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build(spec).eval().to(dtype)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, IMAGE_ID, (batch, PROMPT_TEXT), generator=g)
    ids = torch.cat([torch.full((batch, spec.image_tokens), IMAGE_ID), text], dim=1)  # (B, L)
    size = spec.cfg.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g).to(dtype)
    if spec.impl == "vitune":
        from vitune.inference.generate import GenerationConfig, generate
        from vitune.model.fuse import fuse_for_inference
        fuse_for_inference(model.lm)  # the inference form `vitune chat` loads (q/k/v, gate/up fused)
        gen, prompts = GenerationConfig(max_new_tokens=new_tokens, compile=spec.compile), ids.tolist()

        def run() -> int:
            out = generate(model, prompts, pixels, gen, stop_ids=set(), decode=lambda _: "", pad_id=0)
            return sum(len(t) for t in out.token_ids)
    else:
        mask = torch.ones_like(ids)

        @torch.inference_mode()
        def run() -> int:
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            return (out.shape[1] - ids.shape[1]) * batch
    return run


def time_decoding(specs: list[Spec], precision: Precision, batch: int, warmup: int, reps: int,
                  new_tokens: int = NEW_TOKENS) -> list[dict]:
    runs = {s.name: make_decoder(s, precision, batch, new_tokens) for s in specs}
    for s in specs:  # every run must decode all its tokens (no early stop)
        got = runs[s.name]()
        if got != batch * new_tokens:
            raise RuntimeError(f"{s.name} generated {got} tokens, expected {batch * new_tokens}")
    times = alternate(runs, max(warmup - 1, 0), reps)
    rows = []
    for s in specs:
        st = summary(times[s.name])
        rows.append({"model": s.name, "precision": precision, "batch": batch, "new_tokens": new_tokens, **st,
                     "ms_per_token": 1000 * st["s"] / new_tokens, "tokens_per_s": batch * new_tokens / st["s"]})
    return rows


# ---------------------------------------------------------------- the models compared

MAIN_SPECS: dict[str, Callable[[], Spec]] = {
    "vitune-36": lambda: Spec("vitune-36", "vitune", llava_like(small_cfg("none"))),
    "vitune-9": lambda: Spec("vitune-9", "vitune", small_cfg("pool2x2")),
    "hf-36": lambda: Spec("hf-36", "hf", llava_like(small_cfg("none"))),
}


def image_scaling_specs() -> list[Spec]:
    """vitune with 9 / 36 / 36 / 144 image tokens and the same 28 text tokens."""
    return [
        Spec("96px pool2x2", "vitune", small_cfg("pool2x2", 96)),
        Spec("96px none", "vitune", small_cfg("none", 96)),
        Spec("192px pool2x2", "vitune", small_cfg("pool2x2", 192, 256)),
        Spec("192px none", "vitune", small_cfg("none", 192, 256)),
    ]


def text_scaling_specs(lengths=(32, 64, 128, 256)) -> list[Spec]:
    """vitune `small` as shipped (9 image tokens) at total sequence lengths T."""
    return [Spec(f"T={t}", "vitune", small_cfg("pool2x2", 96, t), text_len=t - 9) for t in lengths]


# ---------------------------------------------------------------- memory (one subprocess per model)

def peak_rss_mb() -> float:
    """This process's RSS high-water mark: `VmHWM` from /proc (Linux), else `ru_maxrss`.

    `VmHWM` belongs to the process's own address space, so it starts afresh at exec; on Linux
    `ru_maxrss` can carry the parent's high-water mark into a subprocess.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    per_mb = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb


def saved_activation_mb(spec: Spec, model, precision: Precision, batch: dict[str, torch.Tensor]) -> float:
    """MiB of tensors one forward keeps for backward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision):
        loss_of(spec, model, batch)
    return sum(seen.values()) / 2**20


def memory_probe(spec: Spec, precision: Precision, batch: int, steps: int, with_transformers: bool) -> dict:
    """Meant for a fresh process: import, note the peak RSS, train `steps` steps, note it again.

    `with_transformers` imports transformers' model classes even for vitune, so that the
    baseline holds the same libraries and `peak - import` compares the training itself.
    """
    import vitune.model.vlm  # noqa: F401
    if spec.impl == "hf" or with_transformers:
        from transformers import CLIPVisionModel, LlamaModel, LlavaForConditionalGeneration  # noqa: F401
    base = peak_rss_mb()
    model, step = make_trainer(spec, precision, batch)
    for _ in range(steps):
        step()
    peak = peak_rss_mb()
    saved = saved_activation_mb(spec, model, precision, make_batch(spec, batch))
    return {"rss_after_import_mb": base, "peak_rss_mb": peak, "peak_minus_import_mb": peak - base,
            "saved_for_backward_mb": saved}


def _probe(name: str, precision: Precision, batch: int, steps: int, threads: int, with_transformers: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--precision", precision,
           "--batch", str(batch), "--steps", str(steps), "--threads", str(threads)]
    out = subprocess.run(cmd + ["--with-transformers"] * with_transformers, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(names: list[str], precision: Precision, batch: int, steps: int, threads: int) -> list[dict]:
    """Per model in `MAIN_SPECS`: a subprocess importing its own library only (what a user sees), and
    for vitune a second one that also imports transformers (training memory on an equal footing)."""
    rows = []
    for name in names:
        own = _probe(name, precision, batch, steps, threads, with_transformers=False)
        both = own if name.startswith("hf") else _probe(name, precision, batch, steps, threads, with_transformers=True)
        rows.append({"model": name, "precision": precision, "batch": batch, "steps": steps,
                     "rss_after_import_mb": own["rss_after_import_mb"], "peak_rss_mb": own["peak_rss_mb"],
                     "train_mb": both["peak_minus_import_mb"], "saved_for_backward_mb": own["saved_for_backward_mb"]})
    return rows


# ---------------------------------------------------------------- tables

def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A right-aligned text table; cols are (header, key, format spec)."""
    cells = [[h for h, _, _ in cols]] + [[format(r[k], f) for _, k, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def add_ratios(rows: list[dict], key: str, ref: str = "hf-36") -> None:
    """`vs_hf`: row[key] over the transformers row of the same precision and batch (>1: vitune faster)."""
    for r in rows:
        base = next(b for b in rows if b["model"] == ref and b["precision"] == r["precision"] and b["batch"] == r["batch"])
        r["vs_hf"] = r[key] / base[key]


def add_growth(rows: list[dict]) -> None:
    """`vs_first`: step time over the first row's (>1: slower)."""
    for r in rows:
        r["vs_first"] = r["s"] / rows[0]["s"]


TRAIN_COLS = [("model", "model", "s"), ("prec", "precision", "s"), ("img tok", "image_tokens", "d"), ("T", "T", "d"),
              ("step ms", "step_ms", ".1f"), ("min ms", "min_ms", ".1f"), ("samples/s", "samples_per_s", ".1f"),
              ("tokens/s", "tokens_per_s", ".0f"), ("x hf", "vs_hf", ".2f"), ("spread", "spread", ".2f"), ("n", "n", "d")]
DECODE_COLS = [("model", "model", "s"), ("prec", "precision", "s"), ("batch", "batch", "d"),
               ("ms/token", "ms_per_token", ".2f"), ("new tok/s", "tokens_per_s", ".0f"), ("x hf", "vs_hf", ".2f"),
               ("spread", "spread", ".2f"), ("n", "n", "d")]
MEM_COLS = [("model", "model", "s"), ("prec", "precision", "s"), ("RSS after import MB", "rss_after_import_mb", ".0f"),
            ("peak RSS MB", "peak_rss_mb", ".0f"), ("peak - import MB (both libs)", "train_mb", ".0f"),
            ("saved for backward MB", "saved_for_backward_mb", ".1f")]
SCALE_COLS = [("config", "model", "s"), ("prec", "precision", "s"), ("img tok", "image_tokens", "d"), ("T", "T", "d"),
              ("step ms", "step_ms", ".1f"), ("samples/s", "samples_per_s", ".1f"), ("tokens/s", "tokens_per_s", ".0f"),
              ("time x first", "vs_first", ".2f"), ("spread", "spread", ".2f"), ("n", "n", "d")]


# ---------------------------------------------------------------- host noise

def _jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process and its waited-for children)."""
    try:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait (steal counts as busy)
    return busy, sum(int(x) for x in own[11:15])  # utime, stime, cutime, cstime


class HostNoise:
    """Share of the machine's CPU time used by *other* processes while a section ran (0: quiet)."""

    def __enter__(self) -> "HostNoise":
        self.t0, self.j0, self.others = time.perf_counter(), _jiffies(), float("nan")
        return self

    def __exit__(self, *exc) -> None:
        j1 = _jiffies()
        if self.j0 is None or j1 is None:
            return
        hz, wall = os.sysconf("SC_CLK_TCK"), time.perf_counter() - self.t0
        others = (j1[0] - self.j0[0]) - (j1[1] - self.j0[1])
        self.others = max(others, 0) / hz / (wall * (os.cpu_count() or 1))


# ---------------------------------------------------------------- the run

@dataclass(frozen=True)
class Plan:
    warmup: int          # untimed calls per model before timing (>= 3 for the real runs)
    train_reps: int      # rounds of 1 timed step per model
    decode_reps: int     # rounds of 1 timed generate call per model
    scale_reps: int
    mem_steps: int
    scale_precisions: tuple[str, ...] = ("fp32", "bf16")


PLANS = {"quick": Plan(warmup=3, train_reps=2, decode_reps=2, scale_reps=2, mem_steps=1, scale_precisions=("bf16",)),
         "full": Plan(warmup=3, train_reps=10, decode_reps=7, scale_reps=5, mem_steps=3)}


def bench_training(specs: list[Spec], plan: Plan) -> list[dict]:
    rows = []
    for prec in ("fp32", "bf16"):
        rows += time_training(specs, prec, BATCH, plan.warmup, plan.train_reps)
    add_ratios(rows, "samples_per_s")
    return rows


def bench_decoding(specs: list[Spec], plan: Plan) -> list[dict]:
    """Every spec, and each vitune one with its decode step compiled too (`-compiled`; the compile
    happens in the untimed first call)."""
    specs = specs + [dataclasses.replace(s, name=f"{s.name}-compiled", compile=True) for s in specs
                     if s.impl == "vitune"]
    rows = []
    for prec in ("bf16", "fp32"):
        for b in (1, 8):
            rows += time_decoding(specs, prec, b, plan.warmup, plan.decode_reps)
    add_ratios(rows, "tokens_per_s")
    return rows


def bench_scaling(specs: list[Spec], plan: Plan) -> list[dict]:
    rows = []
    for prec in plan.scale_precisions:
        part = time_training(specs, prec, BATCH, plan.warmup, plan.scale_reps)
        add_growth(part)
        rows += part
    return rows


def machine() -> dict:
    import transformers
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": os.getloadavg()}


SECTIONS = [  # (result key, title, columns)
    ("train", f"Training step, batch {BATCH}, AdamW, median (x hf: samples/s over transformers')", TRAIN_COLS),
    ("decode", f"Greedy decoding of {NEW_TOKENS} new tokens, prompt = image + {PROMPT_TEXT} text tokens, weights in "
               "the given dtype, prefill included, median (x hf: tokens/s over transformers')", DECODE_COLS),
    ("memory", f"Memory: training, batch {BATCH}, fresh subprocesses; RSS after import and peak RSS (VmHWM) with the "
               "model's own library imported; peak - import with vitune AND transformers imported first (equal "
               "baseline); saved for backward = tensors one forward keeps, parameters excluded", MEM_COLS),
    ("scale_image_tokens", f"vitune step time vs image tokens (batch {BATCH}, {TEXT_LEN} text tokens, median)",
     SCALE_COLS),
    ("scale_text", f"vitune step time vs sequence length (batch {BATCH}, `small` as shipped: 9 image tokens, median)",
     SCALE_COLS),
]


def run_all(plan: Plan, threads: int, say: Callable[[str], None], sections: tuple[str, ...] = ()) -> dict:
    res: dict = {"machine": machine(), "plan": dataclasses.asdict(plan), "others_cpu_share": {}}
    say(f"machine: {res['machine']}")
    specs = [build_spec() for build_spec in MAIN_SPECS.values()]
    say("parameters: " + ", ".join(f"{s.name} {n_params(build(s)) / 1e6:.3f} M" for s in specs))
    work = {
        "train": lambda: bench_training(specs, plan),
        "decode": lambda: bench_decoding(specs, plan),
        "memory": lambda: [r for prec in ("fp32", "bf16")
                           for r in measure_memory(list(MAIN_SPECS), prec, BATCH, plan.mem_steps, threads)],
        "scale_image_tokens": lambda: bench_scaling(image_scaling_specs(), plan),
        "scale_text": lambda: bench_scaling(text_scaling_specs(), plan),
    }
    for key, title, cols in SECTIONS:
        if sections and key not in sections:
            continue
        with HostNoise() as noise:
            res[key] = work[key]()
        res["others_cpu_share"][key] = noise.others
        say(f"\n## {title}\n{table(res[key], cols)}\nother processes used {noise.others:.0%} of the machine's CPU")
    res["machine"]["loadavg_end"] = os.getloadavg()
    busiest, cpus = max(res["others_cpu_share"].values()), os.cpu_count() or 1
    if busiest * cpus + torch.get_num_threads() > cpus + 0.2:  # others' cores + ours > the machine
        say(f"\nWARNING: other processes used up to {busiest:.0%} of the CPU, so this run's {torch.get_num_threads()} "
            "thread(s) competed with them: the figures are noisy (see `spread`). On a shared machine, "
            "`--threads 1` suffers far less than two threads.")
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few repeats: a smoke run of ~1-2 minutes")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--sections", default="", help=f"comma-separated, of {', '.join(k for k, _, _ in SECTIONS)} "
                                                  "(default: all)")
    p.add_argument("--memory-probe", choices=sorted(MAIN_SPECS), help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--with-transformers", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        spec = MAIN_SPECS[args.memory_probe]()
        print(json.dumps(memory_probe(spec, args.precision, args.batch, args.steps, args.with_transformers)))
        return
    t0 = time.perf_counter()
    sections = tuple(x for x in args.sections.split(",") if x)
    unknown = sorted(set(sections) - {k for k, _, _ in SECTIONS})
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {[k for k, _, _ in SECTIONS]}")
    res = run_all(PLANS["quick" if args.quick else "full"], args.threads, lambda s: print(s, flush=True), sections)
    res["wall_s"] = time.perf_counter() - t0
    print(f"\nwall time {res['wall_s']:.0f} s; load average at start {res['machine']['loadavg_start']}, "
          f"at end {res['machine']['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark: greedy decoding of SmolLM2-135M-Instruct, engine by engine, side by side.

Engines, all on the packaged model (`vitune convert smollm2` caches its fp32 copy once):

- `vitune-fp32`, `vitune-bf16` (weights cast to bf16): vitune's LM in a VLM, through `generate_steps`
  (text only: the VLM's vision tower is a tiny random one, never run);
- `vitune-int8`, `vitune-int4`: the same LM weight-only quantised (model/quant.py), the rest in bf16;
- `vitune-int4-lora`: int4 with rank-16 LoRA adapters on every projection kept in float beside the
  quantised base (what `vitune quantize` makes of a `smol` model as trained; random adapters);
- every vitune engine runs the LM in its fused inference form (model/fuse.py: q/k/v and gate/up as
  one matmul each), as `vitune chat` loads it; `...-unfused`: the layers as stored, for comparison;
- `...-compiled`: the same, the decode step under torch.compile (`GenerationConfig(compile=True)`);
  the warm-up compiles it, and its time is reported as `warmup_s`;
- `hf-fp32`, `hf-bf16`: transformers' `LlamaForCausalLM.generate` on the same cached folder;
- `llama.cpp`: `llama-cpp-python` on the package's own Q4_1 GGUF, batch 1 only, when importable
  (a benchmark extra, never installed by vitune; otherwise its row says "not installed").

Each batch of B rows holds the first B chat prompts below (ChatML, left-padded), decodes exactly
`--new-tokens` tokens (no early stop), warm-up once, then `--repeats` timed runs with the engines
taken in turn (a burst of load on the host hits them all alike); the medians are reported:
time to first token (prefill + first pick), decode tok/s (B x (N - 1) tokens after the first, over
the time after it) and end-to-end tok/s (B x N over the whole call). `agree` is the share of tokens
equal to vitune-fp32's up to each row's first difference (1.0: the same greedy answers).

    python bench/bench_decode.py                  # batch 1, 4, 8; 128 new tokens; median of 3
    python bench/bench_decode.py --quick          # batch 1 and 4; 32 new tokens; median of 3
    python bench/bench_decode.py --engines vitune-bf16,vitune-int8 --batches 1 --threads 2
    python bench/bench_decode.py --kernels        # the CPU matmul kernels alone, side by side
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

PROMPTS = (
    "What is the capital of France?", "Why is the sky blue?", "Write a haiku about autumn.",
    "How do I make a cup of tea?", "Name three animals that live in the sea.", "What is photosynthesis?",
    "Give me one tip for learning a new language.", "What is the largest planet in our solar system?",
)


@dataclasses.dataclass(frozen=True)
class VituneEngine:
    dtype: torch.dtype = torch.bfloat16
    bits: int | None = None
    lora: bool = False
    compile: bool = False
    fuse: bool = True  # model/fuse.py's inference form, as Assistant.load gives it


VITUNE = {
    "vitune-fp32": VituneEngine(torch.float32), "vitune-bf16": VituneEngine(),
    "vitune-int8": VituneEngine(bits=8), "vitune-int4": VituneEngine(bits=4),
    "vitune-int4-lora": VituneEngine(bits=4, lora=True),
    "vitune-bf16-unfused": VituneEngine(fuse=False), "vitune-int4-unfused": VituneEngine(bits=4, fuse=False),
    "vitune-int4-lora-unfused": VituneEngine(bits=4, lora=True, fuse=False),
    "vitune-bf16-compiled": VituneEngine(compile=True), "vitune-int8-compiled": VituneEngine(bits=8, compile=True),
    "vitune-int4-compiled": VituneEngine(bits=4, compile=True),
    "vitune-int4-lora-compiled": VituneEngine(bits=4, lora=True, compile=True),
}
ENGINES = (*VITUNE, "hf-fp32", "hf-bf16", "llama.cpp")
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------- engines

def vitune_model(engine: VituneEngine):
    from vitune.checkpoints.pretrained import build_vlm, pretrained_tokenizer
    from vitune.config import LoRAConfig, VisionConfig
    from vitune.model.fuse import fuse_for_inference
    from vitune.model.quant import QuantConfig, quantize_lm
    from vitune.presets import smol
    lora = smol().model.lora if engine.lora else LoRAConfig(rank=0)
    cfg = dataclasses.replace(smol().model, lora=lora, vision=VisionConfig(
        kind="vit", image_size=32, patch_size=16, width=32, layers=1, heads=2, mlp_dim=64))
    tok = pretrained_tokenizer(cfg)
    model = build_vlm(cfg, tok.special.image).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 1e-3, generator=torch.Generator().manual_seed(0))  # small: the answers barely move
    if engine.bits:
        quantize_lm(model.lm, QuantConfig(8) if engine.bits == 8 else QuantConfig(4, 32))
    model.to(engine.dtype)
    if engine.fuse:
        fuse_for_inference(model.lm)
    return model, tok


def vitune_run(handle, prompts: list[list[int]], n_new: int, pad_id: int) -> tuple[float, float, list[list[int]]]:
    from vitune.inference.generate import GenerationConfig, generate_steps
    model, compile = handle
    gen = GenerationConfig(max_new_tokens=n_new, compile=compile)
    tokens, t0 = [], time.perf_counter()
    ttft = None
    for token in generate_steps(model, prompts, None, gen, pad_id):
        tokens.append(token)
        ttft = ttft or time.perf_counter() - t0
    return ttft, time.perf_counter() - t0, torch.stack(tokens, 1).tolist()


def hf_model(engine: str):
    from transformers import AutoModelForCausalLM

    from vitune.checkpoints.hf_import import convert_smollm2
    dtype = torch.float32 if engine == "hf-fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(convert_smollm2(), dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # decode N tokens as vitune does (min_new_tokens would mask eos)
    return model


def hf_run(model, prompts: list[list[int]], n_new: int, pad_id: int) -> tuple[float, float, list[list[int]]]:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # put() gets the prompt first, then each step's tokens
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    clock, t0 = Clock(), time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                             pad_token_id=pad_id, streamer=clock)
    total = time.perf_counter() - t0
    return clock.first - t0, total, out[:, L:].tolist()


def llama_cpp_model(threads: int):
    from llama_cpp import Llama

    from vitune.checkpoints.hf_import import SMOLLM2_GGUF, smollm2_package_dir
    return Llama(model_path=str(smollm2_package_dir() / SMOLLM2_GGUF), n_ctx=512, n_threads=threads,
                 n_batch=512, verbose=False)


def llama_cpp_run(llm, prompts: list[list[int]], n_new: int, pad_id: int) -> tuple[float, float, list[list[int]]]:
    """Batch 1 only: the high-level API decodes one sequence."""
    tokens, t0 = [], time.perf_counter()
    ttft = None
    for token in llm.generate(prompts[0], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        ttft = ttft or time.perf_counter() - t0
        if len(tokens) == n_new:
            break
    return ttft, time.perf_counter() - t0, [tokens]


# ---------------------------------------------------------------------------------------- kernels

def kernels(K: int = 576, N: int = 1536, group: int = 32, rows: tuple[int, ...] = (1, 4, 8)) -> str:
    """Median microseconds of one `(M, K) x (K, N)` product per CPU kernel (SmolLM2's up_proj shape):
    dense fp32 / bf16, the weight-only int8 and int4 kernels with bf16 and with fp32 activations, the
    dynamic-quantisation int4 kernel (fp32 only), int8 dequantised to bf16 then dense, and a rank-16
    LoRA adapter's two small products in bf16 and in fp32."""
    import torch.nn.functional as F
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    wb = w.bfloat16()
    s8 = w.abs().amax(1) / 127
    q8 = (w / s8[:, None]).round().to(torch.int8)
    wg = w.reshape(N, K // group, group)
    lo, step = wg.amin(-1), (wg.amax(-1) - wg.amin(-1)) / 15
    q4 = ((wg - lo[..., None]) / step[..., None]).round().reshape(N, K).to(torch.int32)
    sz = torch.stack([step.t(), (lo + 8 * step).t()], -1).contiguous()  # (K/g, N, 2)
    p4 = aten._convert_weight_to_int4pack_for_cpu(q4, 2)
    sym = (wg.abs().amax(-1) / 7).clamp(min=1e-8)
    u = ((wg / sym[..., None]).round().clamp(-8, 7) + 8).to(torch.uint8).reshape(N, K // 2, 2)
    pdyn = aten._dyn_quant_pack_4bit_weight((u[..., 0] | (u[..., 1] << 4)).contiguous(), sym, None, group, K, N)
    rank = 16  # the smol preset's LoRA rank
    at, bt = torch.randn(K, rank, generator=g) * 0.02, torch.randn(rank, N, generator=g) * 1e-3
    atb, btb = at.bfloat16(), bt.bfloat16()
    lines = [f"kernel, K={K} N={N}, {torch.get_num_threads()} thread(s): median us per call"]
    for M in rows:
        x = torch.randn(M, K, generator=g)
        xb = x.bfloat16()
        cases = {
            "dense fp32": lambda: F.linear(x, w), "dense bf16": lambda: F.linear(xb, wb),
            "_weight_int8pack_mm, x and scales bf16": lambda: aten._weight_int8pack_mm(xb, q8, s8.bfloat16()),
            "_weight_int8pack_mm, x and scales fp32": lambda: aten._weight_int8pack_mm(x, q8, s8),
            f"_weight_int4pack_mm_for_cpu g{group}, bf16": lambda: aten._weight_int4pack_mm_for_cpu(
                xb, p4, group, sz.bfloat16()),
            f"_weight_int4pack_mm_for_cpu g{group}, fp32": lambda: aten._weight_int4pack_mm_for_cpu(
                x, p4, group, sz),
            f"_dyn_quant_matmul_4bit g{group}, fp32": lambda: aten._dyn_quant_matmul_4bit(x, pdyn, group, K, N),
            "int8 dequantised to bf16, then dense": lambda: F.linear(xb, q8.bfloat16() * s8.bfloat16()[:, None]),
            f"LoRA adapter r={rank} (x A^T) B^T, bf16": lambda: torch.mm(torch.mm(xb, atb), btb),
            f"LoRA adapter r={rank} (x A^T) B^T, fp32": lambda: torch.mm(torch.mm(x, at), bt),
        }
        for name, fn in cases.items():
            lines.append(f"  M={M:<3} {name:<42} {_median_us(fn):>9.0f}")
    return "\n".join(lines)


def _median_us(fn, budget_s: float = 0.3) -> float:
    fn()
    times = []
    while sum(times) < budget_s or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


# ---------------------------------------------------------------------------------------- the run

def chat_prompts(tok, n: int) -> list[list[int]]:
    from vitune.data.chat import Message, render
    return [render(tok, [Message("user", q)], "chatml", 0, add_generation_prompt=True).input_ids
            for q in PROMPTS[:n]]


def load_engines(names: list[str], threads: int) -> tuple[dict, dict[str, str], object]:
    """{name: (handle, run)}, {name: why it is missing}, the vitune tokenizer."""
    loaded, missing, tok = {}, {}, None
    for name in names:
        if name == "llama.cpp":
            if importlib.util.find_spec("llama_cpp") is None:
                missing[name] = "not installed"
                continue
            loaded[name] = (llama_cpp_model(threads), llama_cpp_run)
        elif name.startswith("hf-"):
            loaded[name] = (hf_model(name), hf_run)
        else:
            model, tok = vitune_model(VITUNE[name])
            loaded[name] = ((model, VITUNE[name].compile), vitune_run)
    if tok is None:
        from vitune.checkpoints.pretrained import pretrained_tokenizer
        from vitune.presets import smol
        tok = pretrained_tokenizer(smol().model)
    return loaded, missing, tok


def agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    same = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g))) for r, g in zip(ref, got)]
    return sum(same) / sum(len(r) for r in ref)


def measure(loaded: dict, batch: int, prompts: list[list[int]], n_new: int, repeats: int, pad_id: int) -> dict:
    """{engine: {"ttft": [...], "total": [...], "tokens": ...}} for one batch size, engines in turn."""
    runs = {name: {"ttft": [], "total": [], "tokens": None, "warmup_s": 0.0} for name in loaded
            if batch == 1 or name != "llama.cpp"}
    for name in runs:  # warm-up at the timed shapes: allocation, kernel selection, caches, compiles
        handle, run = loaded[name]
        t0 = time.perf_counter()
        run(handle, prompts[:batch], n_new, pad_id)
        runs[name]["warmup_s"] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, r in runs.items():
            handle, run = loaded[name]
            ttft, total, tokens = run(handle, prompts[:batch], n_new, pad_id)
            r["ttft"].append(ttft)
            r["total"].append(total)
            r["tokens"] = tokens
    return runs


def summarise(runs: dict, batch: int, n_new: int) -> list[dict]:
    ref = runs.get("vitune-fp32", {}).get("tokens")
    rows = []
    for name, r in runs.items():
        ttft, total = statistics.median(r["ttft"]), statistics.median(r["total"])
        rows.append({"engine": name, "batch": batch, "ttft_ms": 1000 * ttft,
                     "decode_tok_s": batch * (n_new - 1) / (total - ttft), "e2e_tok_s": batch * n_new / total,
                     "agree": agreement(ref, r["tokens"]) if ref and name != "llama.cpp" else None,
                     "warmup_s": r["warmup_s"],
                     "ttft_s_runs": r["ttft"], "total_s_runs": r["total"]})
    return rows


def table(rows: list[dict], missing: dict[str, str]) -> str:
    lines = [f"{'engine':<26} {'batch':>5} {'TTFT ms':>8} {'decode tok/s':>13} {'e2e tok/s':>10} {'agree':>6} "
             f"{'warm-up s':>9}"]
    for r in rows:
        agree = "-" if r["agree"] is None else f"{r['agree']:.2f}"
        lines.append(f"{r['engine']:<26} {r['batch']:>5} {r['ttft_ms']:>8.0f} {r['decode_tok_s']:>13.1f} "
                     f"{r['e2e_tok_s']:>10.1f} {agree:>6} {r['warmup_s']:>9.1f}")
    lines += [f"{name:<26} {'':>5} {why}" for name, why in missing.items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1 and 4, 32 new tokens")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,4,8; --quick 1,4)")
    p.add_argument("--new-tokens", type=int, help="tokens decoded per row (default 128; --quick 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help=f"write the results here (default {RESULTS}/DATE-decode[-quick].json)")
    p.add_argument("--kernels", action="store_true", help="only time the matmul kernels, side by side")
    args = p.parse_args()
    if args.kernels:
        torch.set_num_threads(args.threads)
        print(kernels())
        return
    names = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(names) - set(ENGINES))
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    batches = [int(b) for b in (args.batches or ("1,4" if args.quick else "1,4,8")).split(",")]
    if max(batches) > len(PROMPTS):
        p.error(f"--batches: at most {len(PROMPTS)} (one prompt per row)")
    n_new = args.new_tokens or (32 if args.quick else 128)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load0 = os.getloadavg()[0]
    loaded, missing, tok = load_engines(names, args.threads)
    prompts = chat_prompts(tok, max(batches))
    rows = []
    for b in batches:
        rows += summarise(measure(loaded, b, prompts, n_new, args.repeats, tok.special.eos), b, n_new)
    print(table(rows, missing))
    out = Path(args.json) if args.json else RESULTS / f"{time.strftime('%Y-%m-%d')}-decode{'-quick' * args.quick}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "cpu": torch.backends.cpu.get_cpu_capability(),
            "new_tokens": n_new, "repeats": args.repeats, "prompt_tokens": [len(x) for x in prompts],
            "load_average_before": load0, "load_average_after": os.getloadavg()[0], "missing": missing}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"written to {out} (load average {load0:.1f} before, {meta['load_average_after']:.1f} after)")


if __name__ == "__main__":
    main()

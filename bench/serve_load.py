"""Load benchmark of `vitune serve` (continuous batching) beside a naive server that answers one
request at a time with transformers' `generate` (the server a user would write: FastAPI, a lock,
`LlavaForConditionalGeneration.generate` streaming through a `TextIteratorStreamer`, on the
model exported with `vitune export --format hf`).

For each level of N concurrent clients (default 1, 2, 4, 8, 16), every client sends M streaming
chat requests one after another (an image and a question each, greedy, `max_tokens` fixed), on
loopback only, each level bounded by `--level-timeout` seconds (clients stop starting requests
after it). Per level: p50/p95 latency (request start to `[DONE]`), p50/p95 time to first token
(to the first chunk with content), generated tokens/s over the level (the servers' usage counts),
errors. Both servers run as subprocesses with the same torch thread count; their answers are the
same tokens (greedy, same weights), so they do the same work.

    python bench/serve_load.py                      # a tiny RANDOM model (measures the server only)
    python bench/serve_load.py --size base          # a larger random model: more compute per token
    python bench/serve_load.py --model runs/smol-full/run/model --clients 1,8 --requests 4

Prints a table and writes bench/results/DATE-serve-load.json (with the command). Goal (issue 10):
with 8 clients, tokens/s >= 3x one client's, and p95 time to first token <= 2x one client's.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# -- the naive server: transformers' generate, one request at a time --------------------------------

def naive_app(hf_dir: str):
    import torch
    import transformers
    model = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(hf_dir)
    lock, app = threading.Lock(), FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        images, content = [], []
        for part in body["messages"][-1]["content"]:
            if part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": part["text"]})
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=images or None, text=text, return_tensors="pt")
        streamer = transformers.TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        out: dict = {}

        def run() -> None:
            with lock, torch.inference_mode():  # one request at a time
                out["ids"] = model.generate(**inputs, max_new_tokens=body["max_tokens"], do_sample=False,
                                            streamer=streamer)
        worker = threading.Thread(target=run)
        worker.start()

        def events():
            for piece in streamer:
                if piece:
                    yield f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n"
            worker.join()
            n = out["ids"].shape[1] - inputs["input_ids"].shape[1]
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return app


def run_naive_server(hf_dir: str, threads: int) -> None:
    import torch
    import uvicorn
    torch.set_num_threads(threads)
    from vitune.serving.server import bind
    sock = bind("127.0.0.1", 0)
    print(f"naive server at http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(naive_app(hf_dir), log_level="warning")).run(sockets=[sock])


# -- servers as subprocesses -----------------------------------------------------------------------

@dataclass
class Server:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    url: str = ""

    def __enter__(self) -> "Server":
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if " at http://" not in line:
            raise RuntimeError(f"{self.name} server did not start: {line!r}")
        self.url = line.split(" at ")[1].split()[0].rstrip(";")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the load --------------------------------------------------------------------------------------

@dataclass
class Sample:
    latency_s: float
    ttft_s: float
    tokens: int


@dataclass
class Level:
    clients: int
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    first_error: str = ""

    def summary(self) -> dict:
        lat = [s.latency_s for s in self.samples]
        ttft = [s.ttft_s for s in self.samples]
        tokens = sum(s.tokens for s in self.samples)
        pct = (lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan"))
        return {"clients": self.clients, "requests": self.requests, "errors": self.errors,
                "first_error": self.first_error, "wall_s": round(self.wall_s, 3), "tokens": tokens,
                "tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s else 0.0,
                "latency_p50_s": round(pct(lat, 50), 4), "latency_p95_s": round(pct(lat, 95), 4),
                "ttft_p50_s": round(pct(ttft, 50), 4), "ttft_p95_s": round(pct(ttft, 95), 4)}


def data_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(http: httpx.Client, url: str, model: str, i: int, images: list[str], max_tokens: int) -> Sample:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[i % 4]}},
                                                      {"type": "text", "text": f"question {i}: what is shown?"}]}]}
    t0, ttft, tokens, done = time.monotonic(), None, 0, False
    with http.stream("POST", f"{url}/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") or c.get("finish_reason")
                                    for c in event.get("choices", [])):
                ttft = time.monotonic() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    end = time.monotonic() - t0
    return Sample(end, end if ttft is None else ttft, tokens)


def run_level(url: str, model: str, clients: int, per_client: int, max_tokens: int, timeout_s: float) -> Level:
    level, lock = Level(clients), threading.Lock()
    images = [data_url(s) for s in range(4)]
    deadline = time.monotonic() + timeout_s

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as http:
            for k in range(per_client):
                if time.monotonic() > deadline:
                    return
                try:
                    sample, err = one_request(http, url, model, c * per_client + k, images, max_tokens), ""
                except Exception as e:  # noqa: BLE001 - counted and reported
                    sample, err = None, f"{type(e).__name__}: {e}"
                with lock:
                    level.requests += 1
                    if sample is None:
                        level.errors += 1
                        level.first_error = level.first_error or err
                    else:
                        level.samples.append(sample)
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.wall_s = time.monotonic() - t0
    return level


def measure(server: Server, model: str, args) -> list[dict]:
    out = []
    with server:
        with httpx.Client(timeout=120) as http:  # warm up
            one_request(http, server.url, model, 0, [data_url(s) for s in range(4)], 4)
        for n in args.clients:
            s = run_level(server.url, model, n, args.requests, args.max_tokens, args.level_timeout).summary()
            print(f"  {server.name:>8} {n:>3} clients: {s['tokens_per_s']:8.1f} tok/s  latency p50 "
                  f"{s['latency_p50_s']:.3f} p95 {s['latency_p95_s']:.3f} s  ttft p50 {s['ttft_p50_s']:.3f} p95 "
                  f"{s['ttft_p95_s']:.3f} s  {s['requests']} requests, {s['errors']} errors", flush=True)
            out.append(s)
    return out


# -- the run ---------------------------------------------------------------------------------------

SIZES = ("tiny", "base")


def random_model(folder: Path, size: str) -> Path:
    """A RANDOM model (weights spread so answers vary; byte tokenizer): measures the server, not a
    model. `tiny`: the tiny preset (an LM of 64 wide, 2 layers); `base`: an LM of 256 wide, 4 layers
    (LMConfig's defaults) behind a 64 px ViT of 64 image tokens: more compute per token."""
    import dataclasses

    import torch

    from vitune.checkpoints.model_folder import save_pretrained
    from vitune.config import LMConfig, VisionConfig
    from vitune.data.tokenizer import byte_level
    from vitune.model.vlm import VLM
    from vitune.presets import tiny
    tok = byte_level()
    torch.manual_seed(0)
    cfg = tiny().model
    lm = dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size, max_seq_len=256)
    if size == "base":
        lm = LMConfig(vocab_size=tok.vocab_size, max_seq_len=256)
        cfg = dataclasses.replace(cfg, vision=VisionConfig(kind="vit", image_size=64, patch_size=8, width=128,
                                                           layers=2, heads=4, mlp_dim=256))
    model = VLM(dataclasses.replace(cfg, lm=lm), tok.special.image).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return save_pretrained(model, tok, folder)


def goal(rows: list[dict]) -> dict:
    by = {r["clients"]: r for r in rows}
    if 1 not in by or 8 not in by or not by[1]["tokens_per_s"]:
        return {}
    return {"throughput_8_over_1": round(by[8]["tokens_per_s"] / by[1]["tokens_per_s"], 2),
            "ttft_p95_8_over_1": round(by[8]["ttft_p95_s"] / by[1]["ttft_p95_s"], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a vitune model folder (default: a random model of --size, in a temp folder)")
    p.add_argument("--size", choices=SIZES, default="tiny", help="the random model's size (without --model)")
    p.add_argument("--clients", default="1,2,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--requests", type=int, default=4, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--level-timeout", type=float, default=120.0, help="seconds per level (then clients stop)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers one-at-a-time server")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-serve-load.json"))
    p.add_argument("--naive-server", metavar="HF_DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.naive_server:
        run_naive_server(args.naive_server, args.threads)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else random_model(Path(tmp) / "random", args.size)
        label = str(args.model) if args.model else f"{args.size} RANDOM model (untrained; measures the server only)"
        print(f"model: {label}; clients {args.clients} x {args.requests} requests, max_tokens {args.max_tokens}, "
              f"{args.threads} torch thread(s) per server, {os.cpu_count()} CPUs", flush=True)
        vitune = Server("vitune", [sys.executable, "-m", "vitune.serving", "--model", str(model_dir), "--port", "0",
                                   "--model-name", "m", "--max-batch", str(max(args.clients)),
                                   "--threads", str(args.threads)])
        results = {"vitune": measure(vitune, "m", args)}
        if not args.no_baseline:
            from vitune.checkpoints.export_hf import export_hf
            hf_dir = export_hf(model_dir, Path(tmp) / "hf")
            naive = Server("naive", [sys.executable, __file__, "--naive-server", str(hf_dir),
                                     "--threads", str(args.threads)])
            results["naive_transformers"] = measure(naive, "m", args)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "model": label,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "threads": args.threads},
              "settings": {"clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens},
              "results": results, "goal_vitune": goal(results["vitune"])}
    print(json.dumps(report["goal_vitune"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

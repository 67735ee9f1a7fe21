"""Load benchmark of `vitune serve` (continuous batching) beside a naive server that answers one
request at a time with transformers' `generate` (the server a user would write: FastAPI, a lock,
`LlavaForConditionalGeneration.generate` streaming through a `TextIteratorStreamer`, on the
model exported with `vitune export --format hf`).

For each level of N concurrent clients (default 1, 2, 4, 8, 16), every client sends M streaming
chat requests one after another (an image and a question each, greedy, `max_tokens` fixed), on
loopback only, each level bounded by `--level-timeout` seconds (clients stop starting requests
after it). Per level: p50/p95 latency (request start to `[DONE]`), p50/p95 time to first token
(to the first chunk with content), generated tokens/s over the level (the servers' usage counts),
errors, and the CPU seconds the server process and the load generator used meanwhile (a server
that used much less CPU than `wall_s x threads` shared the machine with other jobs). The clients
are coroutines on one thread of this process, each on a bare keep-alive connection
(`Connection`), so the load takes little of the CPU the server is measured on. Both servers run
as subprocesses with the same torch thread count; their answers are the same tokens (greedy, same
weights), so they do the same work.

By default all clients start at once; equal answers (a random model runs to `max_tokens`) then
keep them in step, so every round's N prompts arrive together and wait for each other's prefill.
`--stagger S` spreads the clients' starts over S seconds, as independent users arrive.

    python bench/serve_load.py                      # a tiny RANDOM model (measures the server only)
    python bench/serve_load.py --size base          # a larger random model: more compute per token
    python bench/serve_load.py --model runs/smol-easy-vqa/run/model --clients 1,8 --max-tokens 64 \
        --question "question {i}: write a long story about this picture." --stagger 3 --no-baseline

Prints a table and writes bench/results/DATE-serve-load.json (with the command). Goal (issue 10):
with 8 clients, tokens/s >= 3x one client's, and p95 time to first token <= 2x one client's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT_S = 120


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


@dataclass(frozen=True)
class Load:
    """What each client sends: `requests` chat requests one after another, request i asking
    `question` (with `{i}` in it) about image i % 4; client c starts `c x stagger_s / clients`
    seconds into its level (0: all at once)."""

    requests: int = 4
    max_tokens: int = 32
    question: str = "question {i}: what is shown?"
    stagger_s: float = 0.0
    timeout_s: float = 120.0


class Connection:
    """One client's HTTP/1.1 keep-alive connection on loopback, as bare as the load needs: POST a
    JSON body, read the response line by line (chunked transfer, as the servers stream). Much
    lighter per streamed chunk than an HTTP library, so that on a small machine the load takes
    little of the CPU the server is measured on."""

    def __init__(self, url: str):
        parts = urlsplit(url)  # http://127.0.0.1:PORT/v1
        self.host, self.port, self.prefix = parts.hostname, parts.port, parts.path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, AsyncIterator[bytes]]:
        """Send the request; the status and the response body's lines (their line ends stripped)."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {self.prefix}{path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json"
                          f"\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, self._lines(headers)

    async def _lines(self, headers: dict) -> AsyncIterator[bytes]:
        pending = b""
        async for piece in self._body(headers):
            *lines, pending = (pending + piece).split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r")
        if pending:
            yield pending.rstrip(b"\r")
        if headers.get("connection") == "close":
            self.writer.close()

    async def _body(self, headers: dict) -> AsyncIterator[bytes]:
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                yield await self.reader.readexactly(size)
                await self.reader.readexactly(2)
            await self.reader.readexactly(2)  # the CRLF after the last (empty) chunk
        else:
            yield await self.reader.readexactly(int(headers.get("content-length", 0)))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def one_request(http: Connection, model: str, i: int, images: list[str], load: Load) -> Sample:
    body = {"model": model, "max_tokens": load.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[i % 4]}},
                                                      {"type": "text", "text": load.question.format(i=i)}]}]}
    t0, ttft, tokens, done = time.monotonic(), None, 0, False
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        status, lines = await http.post("/chat/completions", body)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {b''.join([x async for x in lines])[:200]!r}")
        async for line in lines:
            if not line.startswith(b"data: ") or done:
                continue  # (read on to the end of the body: the connection is kept for the next request)
            if line == b"data: [DONE]":
                done = True
                continue
            if ttft is None or b'"usage"' in line:  # (parse only what is still to learn)
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


async def run_level(url: str, model: str, clients: int, load: Load) -> Level:
    """`clients` coroutines on one event loop (one thread: the load costs the machine little CPU),
    each sending its requests one after another over its own connection."""
    level = Level(clients)
    images = [data_url(s) for s in range(4)]
    deadline = time.monotonic() + load.timeout_s

    async def client(c: int) -> None:
        await asyncio.sleep(c * load.stagger_s / clients)
        http = Connection(url)
        try:
            for k in range(load.requests):
                if time.monotonic() > deadline:
                    return
                try:
                    sample, err = await one_request(http, model, c * load.requests + k, images, load), ""
                except Exception as e:  # noqa: BLE001 - counted and reported
                    sample, err = None, f"{type(e).__name__}: {e}"
                    await http.close()
                    http = Connection(url)
                level.requests += 1
                if sample is None:
                    level.errors += 1
                    level.first_error = level.first_error or err
                else:
                    level.samples.append(sample)
        finally:
            await http.close()
    t0 = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(clients)))
    level.wall_s = time.monotonic() - t0
    return level


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system) used so far by process `pid` (None: this one); None off Linux."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_level(server: "Server", model: str, clients: int, load: Load) -> dict:
    """One level's summary, with the CPU seconds the server and this load generator used meanwhile
    (a server that got much less than `wall_s x threads` was starved by other load)."""
    server0, client0 = cpu_seconds(server.proc.pid), cpu_seconds()
    level = asyncio.run(run_level(server.url, model, clients, load))
    server1, client1 = cpu_seconds(server.proc.pid), cpu_seconds()
    return {**level.summary(), "server_cpu_s": None if server0 is None else round(server1 - server0, 2),
            "client_cpu_s": round(client1 - client0, 2)}


async def warm_up(url: str, model: str) -> None:
    http = Connection(url)
    try:
        await one_request(http, model, 0, [data_url(s) for s in range(4)], Load(max_tokens=4))
    finally:
        await http.close()


def measure(server: Server, model: str, clients: list[int], load: Load) -> list[dict]:
    out = []
    with server:
        asyncio.run(warm_up(server.url, model))
        for n in clients:
            s = measured_level(server, model, n, load)
            print(f"  {server.name:>8} {n:>3} clients: {s['tokens_per_s']:8.1f} tok/s  latency p50 "
                  f"{s['latency_p50_s']:.3f} p95 {s['latency_p95_s']:.3f} s  ttft p50 {s['ttft_p50_s']:.3f} p95 "
                  f"{s['ttft_p95_s']:.3f} s  {s['requests']} requests, {s['errors']} errors  cpu: server "
                  f"{s['server_cpu_s']} s, load {s['client_cpu_s']} s", flush=True)
            out.append(s)
    return out


# -- the run ---------------------------------------------------------------------------------------

SIZES = ("tiny", "base")


def random_model(folder: Path, size: str) -> Path:
    """A RANDOM model (weights spread so answers vary; byte tokenizer): measures the server, not a
    model. `tiny`: the tiny preset (an LM of 64 wide, 2 layers); `base`: an LM of 256 wide, 4 layers
    (LMConfig's defaults) behind a 64 px ViT of 64 image tokens: more compute per token."""

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
    p.add_argument("--question", default=Load.question, help="each request's text ({i}: the request's number); "
                                                              "a question asking for a long answer loads decoding")
    p.add_argument("--stagger", type=float, default=0.0, metavar="S",
                   help="spread the clients' starts over S seconds (0: all at once, so equal answers keep them in "
                        "step and every round's prompts arrive together)")
    p.add_argument("--level-timeout", type=float, default=120.0, help="seconds per level (then clients stop)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers one-at-a-time server")
    p.add_argument("--note", default="", help="a remark kept in the JSON (e.g. whether other jobs shared the machine)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-serve-load.json"))
    p.add_argument("--naive-server", metavar="HF_DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    load = Load(args.requests, args.max_tokens, args.question, args.stagger, args.level_timeout)
    if args.naive_server:
        run_naive_server(args.naive_server, args.threads)
        return 0
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else random_model(Path(tmp) / "random", args.size)
        label = str(args.model) if args.model else f"{args.size} RANDOM model (untrained; measures the server only)"
        print(f"model: {label}; clients {args.clients} x {load}, "
              f"{args.threads} torch thread(s) per server, {os.cpu_count()} CPUs", flush=True)
        vitune = Server("vitune", [sys.executable, "-m", "vitune.serving", "--model", str(model_dir), "--port", "0",
                                   "--model-name", "m", "--max-batch", str(max(args.clients)),
                                   "--threads", str(args.threads)])
        results = {"vitune": measure(vitune, "m", args.clients, load)}
        if not args.no_baseline:
            from vitune.checkpoints.export_hf import export_hf
            hf_dir = export_hf(model_dir, Path(tmp) / "hf")
            naive = Server("naive", [sys.executable, __file__, "--naive-server", str(hf_dir),
                                     "--threads", str(args.threads)])
            results["naive_transformers"] = measure(naive, "m", args.clients, load)
    report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "model": label,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "threads": args.threads,
                          "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
              "note": args.note,
              "settings": {"clients": args.clients, **dataclasses.asdict(load)},
              "results": results, "goal_vitune": goal(results["vitune"])}
    print(json.dumps(report["goal_vitune"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

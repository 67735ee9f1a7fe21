"""`vitune serve`: its options (`add_serve_parser`) and what it runs (`run_serve`).

    vitune serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 8] ...

This module imports nothing heavy at the top: `vitune --help` must not need the `serve` extra
(fastapi, uvicorn, prometheus-client); `run_serve` says how to install it when it is missing.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

API_KEY_ENV = "VITUNE_API_KEY"


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to a `vitune` subparsers object; its `fn` default is `run_serve`."""
    from vitune.data.processor import MAX_IMAGE_PIXELS, MAX_PIXELS_ENV
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (chat completions, "
                                            "embeddings), batching concurrent requests")
    p.add_argument("--model", required=True, help="a model folder (or a training output folder holding model/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: a free port (the line printed at start says which)")
    p.add_argument("--model-name", default="", help="the model id clients send (default: the folder's name)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, "
                                                   "unset: no key)")
    integer, number = _positive(int), _positive(float)
    p.add_argument("--max-batch", type=integer, default=8, help="requests decoded together (KV cache slots)")
    p.add_argument("--max-queue", type=integer, default=256, help="requests waiting for a slot; more get 503")
    p.add_argument("--default-max-tokens", type=integer, default=256,
                   help="reply budget of a request without max_tokens (cut to what fits the context)")
    p.add_argument("--max-body-mb", type=number, default=20.0, help="largest request body (413 over it)")
    p.add_argument("--read-timeout", type=number, default=30.0, help="seconds a request body may take to arrive")
    p.add_argument("--max-images", type=integer, default=8, help="images per request")
    p.add_argument("--max-image-mb", type=number, default=10.0, help="largest image (decoded bytes)")
    p.add_argument("--max-image-pixels", type=integer, default=None,
                   help=f"largest image, width x height, checked before decoding (default ${MAX_PIXELS_ENV} or "
                        f"{MAX_IMAGE_PIXELS:,})")
    p.add_argument("--allow-file-dir", action="append", default=[], metavar="DIR",
                   help="let requests name image files (file: URLs, paths) under DIR; repeatable; default: none")
    p.add_argument("--drain-timeout", type=number, default=30.0,
                   help="on SIGTERM: seconds in-flight requests get to finish (new ones get 503)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=integer, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning")
    p.set_defaults(fn=run_serve)
    return p


def settings_from(args):
    from vitune.config import ConfigError
    from vitune.serving.settings import MIB, ServeSettings
    extra = {} if args.max_image_pixels is None else {"max_image_pixels": args.max_image_pixels}
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, "")
    try:
        return ServeSettings(
            model_name=args.model_name, api_key=key, max_batch=args.max_batch, max_queue=args.max_queue,
            default_max_tokens=args.default_max_tokens, max_body_bytes=int(args.max_body_mb * MIB),
            read_timeout_s=args.read_timeout, max_images=args.max_images, max_image_bytes=int(args.max_image_mb * MIB),
            allow_file_dirs=tuple(Path(d) for d in args.allow_file_dir), drain_timeout_s=args.drain_timeout, **extra)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _device(name: str) -> str:
    import torch

    from vitune.config import ConfigError
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return name


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args) -> int:
    """Load the model, bind the socket, serve until SIGTERM / Ctrl-C; 0 on a clean stop."""
    from vitune.config import ConfigError
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"vitune serve needs the 'serve' extra ({e.name} is missing): "
                          "pip install 'vitune[serve]'") from None
    import torch

    from vitune.inference.assistant import Assistant
    from vitune.serving.api import create_app
    from vitune.serving.server import bind, serve
    settings = settings_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    assistant = Assistant.load(args.model, device=_device(args.device), precision=args.precision)
    name = settings.model_name or Path(args.model).resolve().name
    sock = bind(args.host, args.port)
    if not _is_loopback(args.host) and not settings.api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who reaches it can use the model "
              f"(set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"vitune serve: model {name!r} at http://{shown}:{port}/v1 (max batch {settings.max_batch}); "
          "Ctrl-C or SIGTERM to stop", flush=True)
    serve(create_app(assistant, settings, name), sock, args.log_level)
    return 0

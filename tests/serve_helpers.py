"""Shared by the serving tests: a tiny random model folder, images as data URLs, and a live server
on 127.0.0.1 (uvicorn in a thread of the test process, on a free port)."""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from vitune.checkpoints.model_folder import save_pretrained
from vitune.config import ContrastiveConfig
from vitune.inference.assistant import Assistant
from vitune.model.vlm import VLM
from vitune.presets import tiny


def tiny_model(tok, seed: int = 0, contrastive: bool = False, **model_changes) -> VLM:
    """A tiny random VLM with its weights spread (noise added) so answers vary with the input."""
    torch.manual_seed(seed)
    cfg = tiny().model
    changes = dict(model_changes)
    if contrastive:
        text = dataclasses.replace(cfg.contrastive.text, dim=32, heads=2, ffn_dim=64, vocab_size=tok.vocab_size,
                                   pad_id=tok.special.eos)
        changes["contrastive"] = ContrastiveConfig(dim=16, text=text)
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size), **changes)
    model = VLM(cfg, tok.special.image).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def model_folder(tok, folder: Path, **kw) -> Path:
    return save_pretrained(tiny_model(tok, **kw), tok, folder)


def image(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(im: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(im))}}


class LiveServer:
    """`create_app` under uvicorn in a thread; `url` is http://127.0.0.1:PORT."""

    def __init__(self, assistant: Assistant, settings, name: str = "tiny"):
        from vitune.serving.api import create_app
        from vitune.serving.server import bind, make_server
        self.app = create_app(assistant, settings, name)
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = make_server(self.app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    @property
    def state(self):
        return self.app.state.server

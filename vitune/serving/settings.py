"""The server's settings: one frozen dataclass of limits and switches, checked once, shared by the
API, the image decoder and the uvicorn runner. `vitune serve` fills it from its options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vitune.data.processor import max_image_pixels

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = ""                  # the id clients send as "model" ("" : the model folder's name)
    api_key: str = ""                     # "" : no key needed
    max_batch: int = 8                    # requests decoded together (KV cache slots)
    max_queue: int = 256                  # requests waiting for a slot; more get 503
    default_max_tokens: int = 256         # when a request gives no max_tokens (cut to what fits the context)
    max_body_bytes: int = 20 * MIB        # a bigger request body: 413
    read_timeout_s: float = 30.0          # the whole body must arrive within this (slow bodies: 408)
    max_images: int = 8                   # per request
    max_image_bytes: int = 10 * MIB       # one image, decoded from base64
    max_image_pixels: int = field(default_factory=max_image_pixels)  # width x height, from the header
    allow_file_dirs: tuple[Path, ...] = ()  # `file:` URLs / paths are read only under these folders
    max_embedding_inputs: int = 64
    drain_timeout_s: float = 30.0         # on SIGTERM: in-flight requests get this long to finish

    def __post_init__(self):
        positive = {"max_batch": self.max_batch, "max_queue": self.max_queue,
                    "default_max_tokens": self.default_max_tokens, "max_body_bytes": self.max_body_bytes,
                    "max_images": self.max_images, "max_image_bytes": self.max_image_bytes,
                    "max_image_pixels": self.max_image_pixels, "max_embedding_inputs": self.max_embedding_inputs}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("read_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for d in self.allow_file_dirs:
            if not Path(d).is_dir():
                raise ValueError(f"allowed image folder {d} is not a folder")

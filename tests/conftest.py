"""Shared fixtures: hermetic (no network), small, fast."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from vitune.data.tokenizer import byte_level  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    return byte_level()


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return tmp_path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from vitune.data.builtin.shapes import generate_shapes
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, n_train=48, n_test=8, seed=1, image_size=96)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread; several threads only add contention overhead on a busy CPU."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Training state for exact resume: model and optimizer tensors, the position in the stage
plan, RNG states, the tokenizer and the resolved config, written as one folder atomically.

    OUT/state/{model.safetensors, optimizer.pt, rng.pt, trainer.json, tokenizer.json, config.yaml}
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import Config, dump_yaml
from .files import atomic_dir
from .model import VLM
from .tokenizer import Tokenizer
from .weights import state_dict_for_save


@dataclass(frozen=True)
class Position:
    stage: int = 0          # index into cfg.train.stages
    step: int = 0           # optimizer steps done in that stage
    global_step: int = 0    # optimizer steps done in all stages


def save_state(folder: Path, model: VLM, optimizer: torch.optim.Optimizer, pos: Position, tok: Tokenizer, cfg: Config) -> None:
    with atomic_dir(folder) as tmp:
        save_file(state_dict_for_save(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(asdict(pos)) + "\n")
        tok.save(tmp)
        (tmp / "config.yaml").write_text(dump_yaml(cfg))


def read_position(folder: Path) -> Position:
    return Position(**json.loads((folder / "trainer.json").read_text()))


def load_state(folder: Path, model: VLM, optimizer: torch.optim.Optimizer | None) -> Position:
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return read_position(folder)

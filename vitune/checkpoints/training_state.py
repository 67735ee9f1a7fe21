"""Training state for exact resume: model and optimizer tensors, the position in the stage
plan, RNG states, the tokenizer and the resolved config, written as one folder atomically.

    OUT/state/{model.safetensors, optimizer.pt, rng.pt, trainer.json, tokenizer.json, config.yaml}

Like a model folder, the state leaves out pretrained parts that no stage trains (model_folder.py): a
resumed run rebuilds them from their sources before loading the state.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vitune.checkpoints.model_folder import stored_state
from vitune.checkpoints.pretrained import pretrained_parts
from vitune.config import Config, dump_yaml
from vitune.data.tokenizer import Tokenizer
from vitune.files import atomic_dir, naming
from vitune.model.lora import is_lora_key
from vitune.model.vlm import VLM


@dataclass(frozen=True)
class Position:
    stage: int = 0          # index into cfg.train.stages
    step: int = 0           # optimizer steps done in that stage
    global_step: int = 0    # optimizer steps done in all stages


def save_state(folder: Path, model: VLM, optimizer: torch.optim.Optimizer, pos: Position, tok: Tokenizer, cfg: Config) -> None:
    with atomic_dir(folder) as tmp:
        save_file(stored_state(model, cfg)[0], str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(asdict(pos)) + "\n")
        tok.save(tmp)
        (tmp / "config.yaml").write_text(dump_yaml(cfg))


def read_position(folder: Path) -> Position:
    with naming(folder / "trainer.json"):
        return Position(**json.loads((folder / "trainer.json").read_text()))


def load_state(folder: Path, model: VLM, optimizer: torch.optim.Optimizer | None) -> Position:
    with naming(folder / "model.safetensors"):
        state = load_file(str(folder / "model.safetensors"))
    own = model.state_dict()
    base = set(pretrained_parts(model.cfg))  # left out when untrained; already loaded from their sources
    missing = [k for k in own if k not in state and (k.split(".", 1)[0] not in base or is_lora_key(k))]
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{folder}: state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    if optimizer is not None:
        with naming(folder / "optimizer.pt"):
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    with naming(folder / "rng.pt"):
        rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return read_position(folder)

"""Training state for exact resume: model and optimizer tensors, the position in the stage
plan, RNG states, the tokenizer and the resolved config, written as one folder atomically.

    OUT/state/{model.safetensors, optimizer.pt, rng.pt, trainer.json, data.json, tokenizer.json, config.yaml}

Everything loads with `torch.load(weights_only=True)`: a state folder from elsewhere cannot run code.

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
import yaml
from safetensors.torch import load_file, save_file

from vitune.checkpoints.model_folder import stored_state
from vitune.checkpoints.pretrained import pretrained_parts
from vitune.config import Config, dump_yaml, from_dict
from vitune.data.tokenizer import Tokenizer
from vitune.files import atomic_dir, naming, recover_dir
from vitune.model.lora import is_lora_key
from vitune.model.vlm import VLM


@dataclass(frozen=True)
class Position:
    stage: int = 0          # index into cfg.train.stages
    step: int = 0           # optimizer steps done in that stage
    global_step: int = 0    # optimizer steps done in all stages


def _rng_state() -> dict:
    """Every RNG a step draws from, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                     "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_state(folder: Path, model: VLM, optimizer: torch.optim.Optimizer, pos: Position, tok: Tokenizer, cfg: Config,
               data: dict[str, str] | None = None) -> None:
    """`data`: stage name -> fingerprint of its data (what a resume checks it is given again)."""
    with atomic_dir(folder) as tmp:
        save_file(stored_state(model, cfg)[0], str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(asdict(pos)) + "\n")
        (tmp / "data.json").write_text(json.dumps(data or {}, indent=2) + "\n")
        tok.save(tmp)
        (tmp / "config.yaml").write_text(dump_yaml(cfg))


def has_state(folder: Path) -> bool:
    recover_dir(folder)
    return (folder / "trainer.json").is_file()


def read_position(folder: Path) -> Position:
    with naming(folder / "trainer.json"):
        return Position(**json.loads((folder / "trainer.json").read_text()))


def read_saved_run(folder: Path) -> tuple[Config, dict[str, str] | None]:
    """The config the state was saved with, and its data fingerprints (None: saved before they were)."""
    with naming(folder / "config.yaml"):
        cfg = from_dict(Config, yaml.safe_load((folder / "config.yaml").read_text()), f"{folder}/config.yaml")
    path = folder / "data.json"
    if not path.is_file():
        return cfg, None
    with naming(path):
        return cfg, json.loads(path.read_text())


def load_state(folder: Path, model: VLM, optimizer: torch.optim.Optimizer | None) -> Position:
    with naming(folder / "model.safetensors"):
        state = load_file(str(folder / "model.safetensors"))
    own = model.state_dict()
    base = set(pretrained_parts(model.cfg))  # left out when untrained; already loaded from their sources
    missing = [k for k in own if k not in state and (k.split(".", 1)[0] not in base or is_lora_key(k))]
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{folder}: state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"other shapes {shapes[:5]}")
    model.load_state_dict(state, strict=False)
    if optimizer is not None:
        with naming(folder / "optimizer.pt"):
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    with naming(folder / "rng.pt"):
        _set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
    return read_position(folder)

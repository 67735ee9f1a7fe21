"""Training state for exact resume: model and optimizer tensors, the position in the stage
plan, RNG states, the tokenizer and the resolved config, written as one folder atomically.

    one process:    OUT/state/{model.safetensors, optimizer.pt, rng.pt, trainer.json, data.json, tokenizer.json,
                               config.yaml}
    under torchrun: OUT/state/{dcp/, rng.pt, rng_rank<R>.pt, trainer.json, data.json, tokenizer.json, config.yaml}

Under torchrun the model and optimizer go through `torch.distributed.checkpoint` (DCP): every
process writes its shards into `dcp/` of the folder process 0 creates, and process 0 swaps it in once
all are done. `load_state` reads either kind into a run of any world size, one process or many, DDP
or FSDP: DCP reshards, and a one-process state is spread over FSDP's shards. Each process keeps its
own RNG state (`rng_rank<R>.pt`; process 0's is `rng.pt`); a process the saving run did not have
takes process 0's.

Everything loads with `torch.load(weights_only=True)`: a state folder from elsewhere cannot run code.

Like a model folder, the state leaves out pretrained parts that no stage trains (model_folder.py): a
resumed run rebuilds them from their sources before loading the state.
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from vitune.checkpoints.model_folder import stored_keys, stored_state
from vitune.checkpoints.pretrained import pretrained_parts
from vitune.config import Config, dump_yaml, from_dict
from vitune.data.tokenizer import Tokenizer
from vitune.files import DataError, atomic_dir, naming, recover_dir
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


DCP = "dcp"  # the sharded model + optimizer folder inside a state saved under torchrun


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng_rank{rank}.pt"


def save_state(folder: Path, model: VLM, optimizer: torch.optim.Optimizer, pos: Position, tok: Tokenizer, cfg: Config,
               data: dict[str, str] | None = None) -> None:
    """`data`: stage name -> fingerprint of its data (what a resume checks it is given again).
    Under torchrun a collective: every process calls it."""
    if _rank_world()[1] > 1:
        return _save_sharded(folder, model, optimizer, pos, tok, cfg, data)
    with atomic_dir(folder) as tmp:
        save_file(stored_state(model, cfg)[0], str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        _write_run(tmp, pos, tok, cfg, data)


def _write_run(tmp: Path, pos: Position, tok: Tokenizer, cfg: Config, data: dict[str, str] | None) -> None:
    (tmp / "trainer.json").write_text(json.dumps(asdict(pos)) + "\n")
    (tmp / "data.json").write_text(json.dumps(data or {}, indent=2) + "\n")
    tok.save(tmp)
    (tmp / "config.yaml").write_text(dump_yaml(cfg))


def _save_sharded(folder: Path, model: VLM, optimizer: torch.optim.Optimizer, pos: Position, tok: Tokenizer,
                  cfg: Config, data: dict[str, str] | None) -> None:
    rank, world = _rank_world()
    keep = stored_keys(model, cfg)
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in keep},
             "optim": get_optimizer_state_dict(model, optimizer)}
    with contextlib.ExitStack() as stack:
        box: list[str | None] = [None]
        try:
            if rank == 0:
                box = [str(stack.enter_context(atomic_dir(folder)))]
        finally:
            dist.broadcast_object_list(box, src=0)  # the temporary folder, or None when it could not be made
        if box[0] is None:
            raise DataError(f"{folder}: process 0 could not create the new state folder (see its error)")
        tmp = Path(box[0])
        dcp.save(state, checkpoint_id=str(tmp / DCP))  # collective; a failure raises in every process
        error = None
        try:
            torch.save(_rng_state(), tmp / _rng_file(rank))
            if rank == 0:
                _write_run(tmp, pos, tok, cfg, data)
        except Exception as e:
            error = e
        failed: list[bool | None] = [None] * world
        dist.all_gather_object(failed, error is not None)  # also: all are done before process 0 swaps it in
        if error is not None:
            raise error
        if any(failed):
            raise DataError(f"{folder}: another process failed to write its part of the state (see its error)")


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
    """Either kind of state (one process or DCP) into `model` (plain, DDP's or FSDP-sharded) and
    `optimizer` (None: the model alone). Under torchrun a collective: every process calls it."""
    if (folder / DCP / ".metadata").is_file():
        _load_sharded(folder / DCP, model, optimizer)
    else:
        _load_whole(folder, model, optimizer)
    rng = folder / _rng_file(_rank_world()[0])
    rng = rng if rng.is_file() else folder / "rng.pt"  # a process the saving run did not have
    with naming(rng):
        _set_rng_state(torch.load(rng, weights_only=True))
    return read_position(folder)


def _check_fits(where: Path, saved: dict[str, tuple[int, ...]], model: VLM) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    base = set(pretrained_parts(model.cfg))  # left out when untrained; already loaded from their sources
    missing = [k for k in own if k not in saved and (k.split(".", 1)[0] not in base or is_lora_key(k))]
    unexpected = sorted(set(saved) - set(own))
    shapes = [f"{k} {v} (model: {own[k]})" for k, v in saved.items() if k in own and v != own[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"other shapes {shapes[:5]}")


def _is_sharded(model: VLM) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _load_whole(folder: Path, model: VLM, optimizer: torch.optim.Optimizer | None) -> None:
    """A one-process state: straight into a whole model, or spread over FSDP's shards."""
    with naming(folder / "model.safetensors"):
        state = load_file(str(folder / "model.safetensors"))
    _check_fits(folder, {k: tuple(v.shape) for k, v in state.items()}, model)
    sharded = _is_sharded(model)
    if sharded:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(state, strict=False)
    if optimizer is None:
        return
    with naming(folder / "optimizer.pt"):
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
        if not sharded:
            optimizer.load_state_dict(saved)
            return
        named = _by_name(saved, optimizer, model)
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
    _drop_unsaved(optimizer, model, set(named["state"]))


def _by_name(saved: dict, optimizer: torch.optim.Optimizer, model: VLM) -> dict:
    """`optimizer.state_dict()`'s parameter indices -> parameter names (what DCP's state dicts use)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}


def _load_sharded(path: Path, model: VLM, optimizer: torch.optim.Optimizer | None) -> None:
    """A DCP state, resharded to this run's world (one process too)."""
    with naming(path / ".metadata"):
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k.removeprefix("model."): tuple(getattr(m, "size", ())) for k, m in meta.items() if k.startswith("model.")}
    _check_fits(path, saved, model)
    state: dict = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in saved}}
    if optimizer is not None:
        # parameters that had no optimizer state when saved (no gradient yet) get none now either
        names = {k.removeprefix("optim.state.").rsplit(".", 1)[0] for k in meta if k.startswith("optim.state.")}
        osd = get_optimizer_state_dict(model, optimizer)
        state["optim"] = {**osd, "state": {k: v for k, v in osd["state"].items() if k in names}}
    with naming(path), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process: meant so
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
        _drop_unsaved(optimizer, model, names)


def _drop_unsaved(optimizer: torch.optim.Optimizer, model: VLM, names: set[str]) -> None:
    """Loading fills in state for every parameter; those the saved optimizer had none for lose it again."""
    by_param = {p: n for n, p in model.named_parameters()}
    for p in [p for p in optimizer.state if by_param.get(p) not in names]:
        del optimizer.state[p]

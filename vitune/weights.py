"""Weights: the model folder format (`config.json` + `model.safetensors` + `tokenizer.json`).

`save_pretrained` writes the whole folder atomically; `load_pretrained` rebuilds the VLM from
`config.json` alone (no code-path guessing from folder names) and loads its tensors strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import ModelConfig, dump_yaml, from_dict, Config, to_dict
from .files import atomic_dir
from .model import VLM
from .tokenizer import Tokenizer

FORMAT = "vitune-vlm"


def state_dict_for_save(model: VLM) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; a tied LM head is stored once (as the embedding)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_pretrained(model: VLM, tok: Tokenizer, folder: str | Path, config: Config | None = None) -> Path:
    folder = Path(folder)
    meta = {"format": FORMAT, "vitune_version": __version__, "image_token_id": model.image_token_id,
            "model": to_dict(model.cfg)}
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_file(state_dict_for_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(tmp)
        if config is not None:
            (tmp / "train_config.yaml").write_text(dump_yaml(config))
    return folder


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model folder or a training output folder (which holds `model/`)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise FileNotFoundError(f"{path}: not a vitune model folder (no config.json)")


def read_model_config(folder: Path) -> tuple[ModelConfig, int]:
    meta = json.loads((folder / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}/config.json: format {meta.get('format')!r} is not {FORMAT!r}")
    return from_dict(ModelConfig, meta["model"], f"{folder}/config.json:model"), int(meta["image_token_id"])


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[VLM, Tokenizer]:
    folder = resolve_model_dir(path)
    cfg, image_id = read_model_config(folder)
    model = VLM(cfg, image_id)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    model.to(device=device, dtype=dtype).eval()
    return model, Tokenizer.load(folder)

"""`vitune merge`: a model folder with LoRA adapters -> a standalone folder with them folded in."""

from __future__ import annotations

from pathlib import Path

from vitune.checkpoints.model_folder import load_pretrained, save_pretrained
from vitune.files import check_output_dir
from vitune.model.lora import merge_lora


def merge_folder(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Load a model folder, merge its adapters and save a standalone folder (all weights stored)."""
    check_output_dir(dst, overwrite, {"model folder": src})
    model, tok = load_pretrained(src)
    if model.cfg.lora.rank == 0:
        raise ValueError(f"{src}: the model has no LoRA adapters to merge (model.lora.rank is 0)")
    return save_pretrained(merge_lora(model), tok, dst)

"""Weights: the model folder format (`config.json` + `model.safetensors` + `tokenizer.json`).

`save_pretrained` writes the whole folder atomically; `load_pretrained` rebuilds the VLM from
`config.json` alone (no code-path guessing from folder names) and loads its tensors strictly.

A part that starts from a pretrained source (`lm_pretrained`, `vision.pretrained`) and that no
stage trained is not stored: `config.json` lists it under `from_base`, and loading takes it from
that source again. A LoRA run's folder thus holds the connector and the adapters, not the 135 M
frozen base weights; `vitune merge` writes a standalone folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vitune import __version__
from vitune.checkpoints.pretrained import base_state, pretrained_parts
from vitune.config import Config, ConfigError, ModelConfig, dump_yaml, from_dict, to_dict, validate
from vitune.data.tokenizer import Tokenizer
from vitune.files import DataError, atomic_dir, naming, recover_dir
from vitune.model.fuse import refuse_fused
from vitune.model.lora import is_lora_key
from vitune.model.vlm import VLM

FORMAT = "vitune-vlm"


def state_dict_for_save(model: VLM) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; a tied LM head is stored once (as the embedding)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def untrained_base_parts(model: VLM, config: Config | None) -> list[str]:
    """Pretrained parts that no stage of `config` trained (none without a config: store everything)."""
    if config is None:
        return []
    trained = {p for s in config.train.stages for p in s.train}
    return [p for p in pretrained_parts(model.cfg) if p not in trained]


def _stored(key: str, from_base: list[str]) -> bool:
    return key.split(".", 1)[0] not in from_base or is_lora_key(key)


def stored_keys(model: VLM, config: Config | None) -> set[str]:
    """The state-dict keys a folder stores (the others come from their pretrained sources)."""
    from_base = untrained_base_parts(model, config)
    return {k for k in model.state_dict() if _stored(k, from_base)}


def stored_state(model: VLM, config: Config | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the tensors a folder stores, the parts it takes from their pretrained sources instead)."""
    from_base = untrained_base_parts(model, config)
    return {k: v for k, v in state_dict_for_save(model).items() if _stored(k, from_base)}, from_base


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    bad = non_finite(state)
    if bad:
        raise DataError(f"{where}: {len(bad)} tensor(s) hold NaN or infinite values, e.g. {bad[:3]}; "
                        "such a model answers nonsense (the training that made it diverged)")


def save_pretrained(model: VLM, tok: Tokenizer, folder: str | Path, config: Config | None = None) -> Path:
    folder = Path(folder)
    refuse_fused(model, f"saving to {folder}")
    state, from_base = stored_state(model, config)
    _check_finite(state, f"refusing to save the model to {folder}")
    meta = {"format": FORMAT, "vitune_version": __version__, "image_token_id": model.image_token_id,
            "from_base": from_base, "model": to_dict(model.cfg)}
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(tmp)
        if config is not None:
            (tmp / "train_config.yaml").write_text(dump_yaml(config))
    return folder


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model folder or a training output folder (which holds `model/`)."""
    path = Path(path)
    recover_dir(path)
    recover_dir(path / "model")
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise FileNotFoundError(f"{path}: not a vitune model folder (no config.json)")


def read_meta(folder: Path) -> dict:
    path = folder / "config.json"
    with naming(path):
        meta = json.loads(path.read_text())
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    for key, kind in (("model", dict), ("image_token_id", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DataError(f"{path}: {key!r} is missing or not a {kind.__name__} (got {meta.get(key)!r})")
    return meta


def read_model_config(folder: Path) -> tuple[ModelConfig, int]:
    meta = read_meta(folder)
    where = f"{folder}/config.json:model"
    cfg = from_dict(ModelConfig, meta["model"], where)
    try:
        validate(Config(model=cfg))  # the ranges and cross-field checks of a training config
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg, meta["image_token_id"]


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[VLM, Tokenizer]:
    folder = resolve_model_dir(path)
    cfg, image_id = read_model_config(folder)
    from_base = tuple(read_meta(folder).get("from_base", ()))
    model = VLM(cfg, image_id)
    state = base_state(cfg, from_base) if from_base else {}
    with naming(folder / "model.safetensors"):
        weights = load_file(str(folder / "model.safetensors"))
    _check_finite(weights, f"{folder / 'model.safetensors'}")
    with naming(folder / "model.safetensors"):  # tensors that do not fit config.json's model
        model.load_state_dict({**state, **weights}, strict=True)
    tok = Tokenizer.load(folder)
    if tok.special.image != image_id:
        raise DataError(f"{folder}/config.json: image_token_id {image_id} is not the tokenizer's <image> id "
                        f"{tok.special.image} (tokenizer.json and config.json are from different models)")
    model.to(device=device, dtype=dtype).eval()
    return model, tok

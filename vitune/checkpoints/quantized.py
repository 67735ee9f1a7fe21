"""Quantised model folders: `vitune quantize`, and loading a model quantised (`--quantize 8|4`).

A quantised folder is a model folder whose `config.json` says `"format": "vitune-vlm-quantized"`
and holds a `quantization` record (`format_version`, `bits`, `group_size`, the quantised `layers`);
`model.safetensors` holds every tensor (standalone: nothing taken from a base), the quantised
layers as `qweight` (int8, or int4 packed two to a byte) with bf16 `scales` (and int4 `zeros`).
A model trained with LoRA keeps its adapters (`lora_A`, `lora_B`, float) beside the quantised base
weights, and its config keeps `lora.rank` (format_version 2; `merge_adapters=True` folds them in
first, which int4 rounds away: model/quant.py).
A reader that does not know quantisation (model_folder.read_meta, also in older vitune releases)
refuses the folder on its `format`; this reader refuses an unknown `format_version`, a missing or
misshapen tensor, and a record that does not fit the model, naming the field or tensor.

    quantize_folder(model_dir, out_dir, bits, group_size, overwrite)   `vitune quantize MODEL OUT`
    load_model(path, device, dtype, quantize=QuantConfig | None)         a float or quantised folder,
                                                                         quantised on load if asked
    save_quantized(model, tok, folder) / load_quantized(path)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vitune import __version__
from vitune.checkpoints.model_folder import FORMAT, load_pretrained, non_finite, resolve_model_dir
from vitune.config import Config, ConfigError, ModelConfig, from_dict, to_dict, validate
from vitune.data.tokenizer import Tokenizer
from vitune.files import DataError, atomic_dir, check_output_dir, naming
from vitune.model.fuse import refuse_fused
from vitune.model.lora import merge_lora
from vitune.model.quant import QuantConfig, quantize_lm, quantized_layers, quantized_layout, quantized_names
from vitune.model.vlm import VLM

QUANT_FORMAT = "vitune-vlm-quantized"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: adapters merged before quantising (lora.rank 0)


def _record(model: VLM) -> dict:
    layers = quantized_layers(model.lm)
    if not layers:
        raise ValueError("the model has no quantised layers: quantize it first (vitune.model.quant.quantize_lm)")
    cfg = next(iter(layers.values())).cfg
    return {"format_version": FORMAT_VERSION, "bits": cfg.bits, "group_size": cfg.group_size,
            "layers": list(layers)}


def _stored_state(model: VLM) -> dict[str, torch.Tensor]:
    """CPU tensors; scales and zeros in bf16 whatever the model was cast to (the format's dtype)."""
    quant = {f"lm.{name}.{key}" for name, layer in quantized_layers(model.lm).items()
             for key in ("scales", "zeros") if hasattr(layer, key)}
    return {k: (v.to(torch.bfloat16) if k in quant else v).detach().to("cpu").contiguous()
            for k, v in model.state_dict().items()}


def save_quantized(model: VLM, tok: Tokenizer, folder: str | Path) -> Path:
    folder = Path(folder)
    refuse_fused(model, f"saving to {folder}")
    record = _record(model)
    state = _stored_state(model)
    bad = non_finite(state)
    if bad:
        raise DataError(f"refusing to save the model to {folder}: {len(bad)} tensor(s) hold NaN or infinite "
                        f"values, e.g. {bad[:3]}")
    meta = {"format": QUANT_FORMAT, "vitune_version": __version__, "image_token_id": model.image_token_id,
            "from_base": [], "quantization": record, "model": to_dict(model.cfg)}
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(tmp)
    return folder


def folder_format(folder: Path) -> object:
    """The `format` a model folder's config.json names (None when it is not a JSON object)."""
    with naming(folder / "config.json"):
        meta = json.loads((folder / "config.json").read_text())
    return meta.get("format") if isinstance(meta, dict) else None


def _quant_config(record: object, where: str) -> QuantConfig:
    if not isinstance(record, dict):
        raise DataError(f"{where}: 'quantization' is missing or not an object (got {record!r})")
    version = record.get("format_version")
    if version not in READABLE_VERSIONS:
        raise DataError(f"{where}: quantization.format_version {version!r} is not one this vitune reads "
                        f"({FORMAT_VERSION}); a newer vitune wrote it: upgrade vitune to load it")
    try:
        return QuantConfig(bits=record.get("bits"), group_size=record.get("group_size"))
    except ConfigError as e:
        raise DataError(f"{where}: {e}") from None


def read_quantized_meta(folder: Path) -> tuple[ModelConfig, int, QuantConfig, list[str]]:
    """(model config, image token id, quantisation, quantised layer names) of a quantised folder."""
    path = folder / "config.json"
    with naming(path):
        meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != QUANT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{path}: format {got!r} is not {QUANT_FORMAT!r} (not a quantised model folder)")
    for key, kind in (("model", dict), ("image_token_id", int), ("quantization", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DataError(f"{path}: {key!r} is missing or not a {kind.__name__} (got {meta.get(key)!r})")
    qcfg = _quant_config(meta["quantization"], str(path))
    layers = meta["quantization"].get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise DataError(f"{path}: quantization.layers must be a list of layer names, got {layers!r}")
    cfg = from_dict(ModelConfig, meta["model"], f"{path}:model")
    try:
        validate(Config(model=cfg))
    except ConfigError as e:
        raise ConfigError(f"{path}:model: {e}") from None
    if cfg.lora.rank and meta["quantization"]["format_version"] < 2:
        raise DataError(f"{path}: model.lora.rank is {cfg.lora.rank}; a format_version 1 folder holds merged "
                        "weights (0)")
    return cfg, meta["image_token_id"], qcfg, layers


def _check_tensors(model: VLM, weights: dict[str, torch.Tensor], where: str) -> None:
    """Each quantised layer's stored tensors: present, of the format's dtype and of the layer's shape."""
    for name, layer in quantized_layers(model.lm).items():
        for key, want in layer.named_buffers():
            full = f"lm.{name}.{key}"
            got = weights.get(full)
            if got is None:
                raise DataError(f"{where}: tensor {full!r} is missing (layer lm.{name}, {layer.cfg.name})")
            if got.dtype != want.dtype or got.shape != want.shape:
                raise DataError(f"{where}: tensor {full!r} is {got.dtype} {tuple(got.shape)}, expected "
                                f"{want.dtype} {tuple(want.shape)} for lm.{name} (in {layer.in_features}, "
                                f"out {layer.out_features}, {layer.cfg.name})")
    bad = non_finite(weights)
    if bad:
        raise DataError(f"{where}: {len(bad)} tensor(s) hold NaN or infinite values, e.g. {bad[:3]}")


def load_quantized(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[VLM, Tokenizer]:
    folder = resolve_model_dir(path)
    cfg, image_id, qcfg, layers = read_quantized_meta(folder)
    model = VLM(cfg, image_id)
    expected = quantized_names(model.lm)
    if layers != expected:
        odd = sorted(set(layers) ^ set(expected))[:3]
        raise DataError(f"{folder}/config.json: quantization.layers does not list this model's linear layers "
                        f"(differs at {odd or 'their order'})")
    quantized_layout(model.lm, qcfg)
    weights_path = folder / "model.safetensors"
    with naming(weights_path):
        weights = load_file(str(weights_path))
    _check_tensors(model, weights, str(weights_path))
    with naming(weights_path):
        model.load_state_dict(weights, strict=True)
    tok = Tokenizer.load(folder)
    if tok.special.image != image_id:
        raise DataError(f"{folder}/config.json: image_token_id {image_id} is not the tokenizer's <image> id "
                        f"{tok.special.image} (tokenizer.json and config.json are from different models)")
    return _ready(model, device, dtype), tok


def _ready(model: VLM, device, dtype: torch.dtype | None) -> VLM:
    model.to(device=device, dtype=dtype).eval()
    for layer in quantized_layers(model).values():
        layer.pack()
    return model


def quantize_model(model: VLM, qcfg: QuantConfig, merge_adapters: bool = False) -> VLM:
    """The LM quantised in place, LoRA adapters kept in float beside the quantised base weights
    (`merge_adapters`: folded in first: one matmul a layer fewer, but int4 rounds them away)."""
    if model.cfg.lora.rank and merge_adapters:
        merge_lora(model)
    quantize_lm(model.lm, qcfg)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               quantize: QuantConfig | None = None) -> tuple[VLM, Tokenizer]:
    """Any model folder: a quantised one as stored; a float one as is, or quantised on load (`quantize`)."""
    folder = resolve_model_dir(path)
    if folder_format(folder) == QUANT_FORMAT:
        model, tok = load_quantized(folder, device, dtype)
        have = next(iter(quantized_layers(model).values())).cfg
        if quantize is not None and quantize != have:
            raise ConfigError(f"{folder} is quantised already ({have.name}); drop --quantize or load its float "
                              f"source to quantise it as {quantize.name}")
        return model, tok
    if quantize is None:
        return load_pretrained(folder, device, dtype)
    model, tok = load_pretrained(folder)  # quantised from the stored precision, then cast
    return _ready(quantize_model(model, quantize), device, dtype), tok


def quantize_folder(model_dir: str | Path, out_dir: str | Path, bits: int, group_size: int | None = None,
                    overwrite: bool = False, merge_adapters: bool = False) -> Path:
    """`vitune quantize MODEL OUT --bits 8|4 [--group-size G] [--merge-adapters]`: a float model folder ->
    a quantised folder (LoRA adapters kept in float unless `merge_adapters`)."""
    qcfg = QuantConfig(bits=bits, group_size=group_size)  # bad values: an error before any work
    check_output_dir(out_dir, overwrite, {"model folder": model_dir})
    folder = resolve_model_dir(model_dir)
    fmt = folder_format(folder)
    if fmt == QUANT_FORMAT:
        raise DataError(f"{folder}: quantised already; quantise its float source instead")
    if fmt != FORMAT:
        raise DataError(f"{folder}/config.json: format {fmt!r} is not {FORMAT!r}")
    model, tok = load_pretrained(folder)
    return save_quantized(quantize_model(model, qcfg, merge_adapters), tok, out_dir)


def quantized_size(model: VLM) -> int:
    """Bytes of the quantised layers' stored tensors (for reports)."""
    return sum(b.numel() * b.element_size() for layer in quantized_layers(model).values()
               for b in list(layer.buffers()) + ([layer.bias] if layer.bias is not None else []))


__all__ = ["QUANT_FORMAT", "FORMAT_VERSION", "load_model", "load_quantized", "quantize_folder",
           "quantize_model", "read_quantized_meta", "save_quantized", "quantized_size"]

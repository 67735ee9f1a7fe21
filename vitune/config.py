"""Config: frozen, typed dataclasses for every part of vitune, presets, YAML and CLI overrides.

    Config
    ├── model: ModelConfig (vision, connector, lm, tokenizer, chat template)
    └── train: TrainConfig (stages as data, optimiser, precision, seeding, logging)

Configs are immutable: derive a changed one with `dataclasses.replace` or `apply_overrides`.
`from_dict` checks every key and value against the field's type, so a typo or a bad value fails
with the dotted name of the field at fault.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vitune.conventions import IMAGE_SLOT

Part = Literal["vision", "fusion", "connector", "lm", "lora", "contrastive"]


class ConfigError(ValueError):
    """A bad config value; the message names the dotted field."""


@dataclass(frozen=True)
class VisionConfig:
    kind: Literal["vit", "cnn", "efficientnet_lite0"] = "vit"
    # Weights to start from (see checkpoints/pretrained.py): "" = random init; "package:efficientnet-lite0"
    # (ImageNet, from the pip package); or a local HF CLIP/SigLIP folder (then the tower's shape
    # fields come from that checkpoint). The resolved config and the weights are saved with the model.
    pretrained: str = ""
    image_size: int = 96
    patch_size: int = 16          # vit: patch side; cnn: total stride of the conv stack
    width: int = 128              # D_v
    layers: int = 2
    heads: int = 4
    mlp_dim: int = 512
    class_token: bool = True      # CLIP has one; it is dropped from the features
    pre_norm: bool = True         # CLIP's pre_layrnorm (SigLIP has none)
    feature_layer: int = -1       # which block's output feeds the connector (-1: last)
    # efficientnet_lite0 only: which map gives the tokens (model/efficientnet.py FEATURE_MAPS; each
    # with its own patch_size and width)
    feature_map: Literal["last", "stride16", "stride16+last"] = "last"
    norm_eps: float = 1e-5
    act: Literal["quick_gelu", "gelu", "gelu_tanh"] = "gelu"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: Literal["pad", "squash"] = "pad"   # pad: to a square of the mean colour, then resize
    # True: training measures image_mean/std on its own images (saved with the model). For towers
    # trained from scratch on images that are mostly background, this is what lets them learn fast.
    stats_from_data: bool = False


@dataclass(frozen=True)
class ConnectorConfig:
    kind: Literal["mlp"] = "mlp"
    reduce: Literal["none", "pool2x2", "pixel_shuffle2x2"] = "none"
    hidden_dim: int = 0           # 0: the LM's width
    # A learned embedding per image-token slot, added to the projected tokens in the LM's space:
    # a clean 2-D position code the LM can match words like "top left" against.
    slot_embedding: bool = False
    # (x, y) of each grid cell in [-1, 1], appended to its features before the projection, as
    # relation networks tag each cell: the position enters with the content, not beside it.
    coords: bool = False


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 512
    dim: int = 256                # D_lm
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn_dim: int = 768
    head_dim: int = 0             # 0: dim // heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    tie_embeddings: bool = True
    qkv_bias: bool = False        # Qwen2 has q/k/v biases


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the LM's linear layers (model/lora.py); rank 0 = none."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


TextAct = Literal["gelu", "gelu_tanh", "relu"]


@dataclass(frozen=True)
class TextConfig:
    """A BERT-family text / instruction encoder (model/text_encoder.py)."""

    vocab_size: int = 30522
    dim: int = 384                # D_t
    layers: int = 6
    heads: int = 12
    ffn_dim: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    act: TextAct = "gelu"
    pad_id: int = 0
    max_len: int = 512            # tokenizer truncation (sentence-transformers' max_seq_length)
    normalize: bool = True        # L2-normalise pooled embeddings


def _small_text() -> TextConfig:
    """The native from-scratch text encoder over the LM's tokenizer (vocab_size and pad_id set from it)."""
    return TextConfig(dim=128, layers=2, heads=4, ffn_dim=256, max_positions=64, max_len=64, norm_eps=1e-5,
                      normalize=False)


FusionKind = Literal["projector", "film", "qformer", "xattn"]


@dataclass(frozen=True)
class FusionConfig:
    """How the instruction shapes what the LM sees of the image (model/fusion.py).

    - `projector`: none; LLaVA's image tokens, the same whatever is asked.
    - `film`: the instruction, encoded once (z = g(t), mean-pooled), scales and shifts the vision
      tower's channels after every `film_every`-th block: h <- gamma(z) * h + beta(z), gamma = 1,
      beta = 0 at init (the unconditioned tower).
    - `qformer`: `queries` learned queries and the encoded instruction attend jointly, the queries
      cross-attend to the image features (plus a 2-D position code); their outputs are the image
      tokens (InstructBLIP's instruction-aware Q-Former).
    - `xattn`: Flamingo's gated cross-attention (model/cross_attention.py): blocks before every
      `xattn_every`-th decoder layer attend from the text to the image (through `latents` learned
      resampler queries, or 0: every tower token), tanh gates at 0; the image takes one marker
      position in the sequence instead of its tokens. `heads` is the blocks' head count.
    The instruction of an image is the text of the user message that holds it (a chat's later
    turns do not change the image tokens). `text` is the native instruction encoder, trained from
    scratch over the LM's tokenizer (vocab_size and pad_id are set from it).
    """

    kind: FusionKind = "projector"
    text: TextConfig = field(default_factory=_small_text)
    film_every: int = 1           # film: modulate after every k-th block of the tower
    queries: int = 9              # qformer: K learned queries = image tokens per image
    layers: int = 2               # qformer blocks
    heads: int = 4                # qformer attention heads
    dim: int = 0                  # qformer width (0: the vision width)
    xattn_every: int = 1          # xattn: a block before every k-th decoder layer
    latents: int = 0              # xattn: Perceiver resampler queries (0: none)

    @property
    def needs_instruction(self) -> bool:
        return self.kind in ("film", "qformer")


@dataclass(frozen=True)
class ContrastiveConfig:
    """Instruction-visual alignment (model/alignment.py): a text encoder g (its own, from scratch,
    over the LM's tokenizer) and linear maps of g(t) and of the mean-pooled tower features into one
    `dim`-d space; s = cos(z, v) / tau with tau learned, starting at `init_temperature` and clamped
    at `min_temperature`. `dim = 0`: no alignment head. Trained by a stage's `contrastive_weight`."""

    dim: int = 0
    text: TextConfig = field(default_factory=_small_text)
    init_temperature: float = 0.07
    min_temperature: float = 0.01


@dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["byte", "bpe"] = "bpe"   # byte: 256 byte tokens; bpe: trained on the training data
    vocab_size: int = 512                  # bpe target size (byte-level base + merges + specials)


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    chat_template: Literal["plain", "chatml"] = "chatml"
    system_prompt: str = ""
    # Pretrained LM to start from (checkpoints/pretrained.py): "" = random init; "smollm2-135m-instruct" (the
    # packaged GGUF, converted once and cached) or a local HF Llama/Qwen2 folder. Its config (all of
    # `lm` but max_seq_len, which is capped by it) and its tokenizer replace `lm` and `tokenizer`.
    lm_pretrained: str = ""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)


@dataclass(frozen=True)
class StageConfig:
    name: str = "instruct"
    data: str = ""                          # LLaVA JSON/JSONL; "" = given on the command line
    template: Literal["plain", "chatml"] = "chatml"
    train: tuple[Part, ...] = ("connector", "lm")
    epochs: float = 1.0                     # used when steps == 0
    steps: int = 0
    batch_size: int = 16
    grad_accum: int = 1
    lr_vision: float = 1e-4
    lr_fusion: float = 1e-3
    lr_connector: float = 1e-3
    lr_lm: float = 1e-4
    lr_lora: float = 2e-4
    lr_contrastive: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1               # cosine decays to lr * min_lr_ratio
    # Extra LLaVA files mixed into this stage (e.g. text-only chats that keep the LM's language
    # ability), cycled until they make up `mix_fraction` of the stage's records (0: each once).
    mix_data: tuple[str, ...] = ()
    mix_fraction: float = 0.0
    # "shared_prefix": the questions about one image share one row behind a single copy of the
    # system prompt and image tokens, each seeing only that prefix and itself (data/packing.py).
    packing: Literal["none", "shared_prefix"] = "none"
    # The stage's loss: lm_weight * LM loss + contrastive_weight * InfoNCE between each record's
    # caption (its first answer) and its first image (model.contrastive). lm_weight 0 with a
    # contrastive weight trains a dual encoder for retrieval alone.
    lm_weight: float = 1.0
    contrastive_weight: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = 0                        # 0: torch's default
    log_every: int = 10
    # The training state (OUT/state) is saved at every stage end, every `save_every` steps (0: not
    # by steps) and every `save_every_minutes` of training (0: not by time), so a crash or kill
    # loses at most one interval; Ctrl-C / SIGTERM save it too.
    save_every: int = 0
    save_every_minutes: float = 10.0
    on_bad_record: Literal["error", "skip"] = "error"
    group_by_length: bool = True            # batch rows of similar length: less padding
    # Under torchrun (docs/distributed.md): "ddp" keeps a whole copy of the model in every process;
    # "fsdp" shards parameters, gradients and optimizer state across them (FSDP2, per decoder block).
    # Each stage's batch_size stays the global batch, split evenly across the processes.
    distributed: Literal["ddp", "fsdp"] = "ddp"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------- dict / YAML conversion

def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}.{i}") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        return _coerce(next(a for a in typing.get_args(tp) if a is not type(None)), value, where)
    if tp is float:
        value = _to_float(value, where)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return value
    if tp in (int, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _to_float(value: Any, where: str) -> float:
    """Numbers, and strings such as "3e-4" (YAML 1.1 reads those as strings)."""
    if not isinstance(value, (int, float, str)) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> Config:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections (model:, train:), got {type(data).__name__}")
    return validate(from_dict(Config, data, str(path)))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- dotted overrides

def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b.c=value` overrides (values parsed as YAML); `stages.0.steps` indexes a tuple."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node, parts = data, key.split(".")
        for p in parts[:-1]:
            node = _step(node, p, key)
        last = parts[-1]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key!r}: the value {raw!r} is not valid YAML ({e.problem})") from None
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        elif isinstance(node, dict) and last in node:
            node[last] = value
        else:
            raise ConfigError(f"override {key!r}: unknown field {last!r}; valid: {sorted(node) if isinstance(node, dict) else 'an index'}")
    return validate(from_dict(Config, data))


def _index(node: list, p: str, key: str) -> int:
    if not p.isdigit() or int(p) >= len(node):
        raise ConfigError(f"override {key!r}: {p!r} is not an index below {len(node)}")
    return int(p)


def _step(node: Any, p: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, p, key)]
    if not isinstance(node, dict) or p not in node:
        raise ConfigError(f"override {key!r}: unknown field {p!r}")
    return node[p]


# ---------------------------------------------------------------- validation

@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: lo <= x (lo < x when `lo_open`), x <= hi (x < hi when `hi_open`)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, x: float) -> bool:
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return above and below and math.isfinite(x)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE = Range(0, lo_open=True), Range(0)
AT_LEAST_1, FRACTION = Range(1), Range(0, 1)

# Every numeric field with a range, per config class; tuples are checked element by element.
RANGES: dict[type, dict[str, Range]] = {
    VisionConfig: {"image_size": AT_LEAST_1, "patch_size": AT_LEAST_1, "width": AT_LEAST_1, "layers": AT_LEAST_1,
                   "heads": AT_LEAST_1, "mlp_dim": AT_LEAST_1, "norm_eps": POSITIVE, "image_mean": FRACTION,
                   "image_std": POSITIVE},
    ConnectorConfig: {"hidden_dim": NON_NEGATIVE},
    LMConfig: {"vocab_size": AT_LEAST_1, "dim": AT_LEAST_1, "layers": AT_LEAST_1, "heads": AT_LEAST_1,
               "kv_heads": AT_LEAST_1, "ffn_dim": AT_LEAST_1, "head_dim": NON_NEGATIVE, "rope_theta": POSITIVE,
               "norm_eps": POSITIVE, "max_seq_len": AT_LEAST_1},
    LoRAConfig: {"rank": NON_NEGATIVE, "alpha": POSITIVE, "dropout": Range(0, 1, hi_open=True)},
    TextConfig: {"vocab_size": AT_LEAST_1, "dim": AT_LEAST_1, "layers": AT_LEAST_1, "heads": AT_LEAST_1,
                 "ffn_dim": AT_LEAST_1, "max_positions": AT_LEAST_1, "type_vocab_size": AT_LEAST_1,
                 "norm_eps": POSITIVE, "pad_id": NON_NEGATIVE, "max_len": AT_LEAST_1},
    FusionConfig: {"film_every": AT_LEAST_1, "queries": AT_LEAST_1, "layers": AT_LEAST_1, "heads": AT_LEAST_1,
                   "dim": NON_NEGATIVE, "xattn_every": AT_LEAST_1, "latents": NON_NEGATIVE},
    ContrastiveConfig: {"dim": NON_NEGATIVE, "init_temperature": POSITIVE, "min_temperature": POSITIVE},
    TokenizerConfig: {"vocab_size": AT_LEAST_1},
    StageConfig: {"epochs": NON_NEGATIVE, "steps": NON_NEGATIVE, "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1,
                  **{f"lr_{p}": NON_NEGATIVE for p in typing.get_args(Part)}, "warmup_steps": NON_NEGATIVE,
                  "min_lr_ratio": FRACTION, "mix_fraction": Range(0, 1, hi_open=True), "lm_weight": NON_NEGATIVE,
                  "contrastive_weight": NON_NEGATIVE},
    TrainConfig: {"seed": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE,
                  "threads": NON_NEGATIVE, "log_every": AT_LEAST_1, "save_every": NON_NEGATIVE,
                  "save_every_minutes": NON_NEGATIVE},
}


def range_errors(node: Any, where: str) -> list[str]:
    """Every numeric field of `node` (a config dataclass, walked recursively) outside its range."""
    if isinstance(node, tuple):
        return [e for i, v in enumerate(node) for e in range_errors(v, f"{where}.{i}")]
    if not dataclasses.is_dataclass(node):
        return []
    out, ranges = [], RANGES.get(type(node), {})
    for f in dataclasses.fields(node):
        value, name = getattr(node, f.name), f"{where}.{f.name}"
        if f.name in ranges:
            values = value if isinstance(value, tuple) else (value,)
            if not all(ranges[f.name].ok(x) for x in values):
                out.append(f"{name} must be {ranges[f.name]}, got {value!r}")
        else:
            out += range_errors(value, name)
    return out


def validate(cfg: Config) -> Config:
    errors = range_errors(cfg.model, "model") + range_errors(cfg.train, "train")
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else "; ".join(errors))
    v, lm = cfg.model.vision, cfg.model.lm
    checks = [
        (v.image_size % v.patch_size == 0, "model.vision.image_size must be a multiple of patch_size"),
        (v.width % v.heads == 0, "model.vision.width must be divisible by heads"),
        (lm.heads % lm.kv_heads == 0, "model.lm.heads must be a multiple of kv_heads"),
        (lm.head_dim > 0 or lm.dim % lm.heads == 0, "model.lm.dim must be divisible by heads"),
        (v.feature_map == "last" or v.kind == "efficientnet_lite0", f"model.vision.feature_map={v.feature_map!r}: "
         f"only an efficientnet_lite0 tower has other feature maps than its last, not kind={v.kind!r}"),
        (bool(v.pretrained) or v.kind != "vit" or -(v.layers + 1) <= v.feature_layer <= v.layers,
         f"model.vision.feature_layer={v.feature_layer} names no hidden state of a {v.layers}-layer tower "
         f"(valid: {-(v.layers + 1)}..{v.layers}, HF's indexing)"),
        (cfg.model.tokenizer.kind != "bpe" or cfg.model.tokenizer.vocab_size > 260,
         "model.tokenizer.vocab_size must be > 260 for bpe (256 bytes + 4 special tokens + merges)"),
        (len(cfg.train.stages) > 0, "train.stages must not be empty"),
        (len(cfg.model.lora.targets) > 0, "model.lora.targets: name at least one layer"),
        (IMAGE_SLOT not in cfg.model.system_prompt,
         "model.system_prompt holds the character U+FFFC, which vitune reserves for image slots"),
        (len({s.name for s in cfg.train.stages}) == len(cfg.train.stages), "train.stages: stage names must be unique"),
        (not (v.pretrained and v.stats_from_data), "model.vision.stats_from_data must be false for a pretrained "
         "tower: its image statistics are part of what it was trained with"),
        (cfg.train.distributed != "fsdp" or cfg.train.device != "mps",
         "train.distributed=fsdp runs on cuda (nccl) or cpu (gloo), not train.device=mps"),
    ]
    checks += _fusion_checks(cfg)
    checks += _contrastive_checks(cfg)
    if cfg.model.connector.reduce != "none":
        g = v.image_size // v.patch_size
        checks.append((g % 2 == 0, f"model.connector.reduce={cfg.model.connector.reduce} needs an even grid, got {g}x{g}"))
    for i, s in enumerate(cfg.train.stages):
        checks += [
            (s.steps > 0 or s.epochs > 0, f"train.stages.{i}: set steps or epochs"),
            (len(s.train) > 0, f"train.stages.{i}.train: name at least one part to train"),
            ("lora" not in s.train or cfg.model.lora.rank > 0,
             f"train.stages.{i}.train names 'lora' but model.lora.rank is 0 (no adapters)"),
        ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def _fusion_checks(cfg: Config) -> list[tuple[bool, str]]:
    f, v = cfg.model.fusion, cfg.model.vision
    checks = [
        (f.kind != "film" or v.kind in ("vit", "cnn"),
         f"model.fusion.kind=film modulates a ViT or CNN tower, not model.vision.kind={v.kind!r}"),
        (f.kind != "xattn" or cfg.model.lm.dim % f.heads == 0,
         "model.fusion.kind=xattn: model.lm.dim must be divisible by model.fusion.heads"),
        (f.kind != "xattn" or not f.latents or v.width % f.heads == 0,
         "model.fusion.latents: model.vision.width must be divisible by model.fusion.heads"),
        (f.kind != "qformer" or cfg.model.connector.reduce == "none",
         "model.fusion.kind=qformer sets the number of image tokens itself (fusion.queries): "
         "model.connector.reduce must be none"),
        (f.kind != "qformer" or (f.dim or v.width) % f.heads == 0,
         "model.fusion.kind=qformer: fusion.dim (0: model.vision.width) must be divisible by fusion.heads"),
        (f.text.dim % f.text.heads == 0, "model.fusion.text.dim must be divisible by fusion.text.heads"),
    ]
    for i, s in enumerate(cfg.train.stages):
        checks += [
            (f.kind == "projector" or s.packing == "none",
             f"train.stages.{i}.packing=shared_prefix shares one copy of the image tokens across questions; "
             f"model.fusion.kind={f.kind} has no such copy to share: use packing=none"),
            ("fusion" not in s.train or f.kind != "projector",
             f"train.stages.{i}.train names 'fusion' but model.fusion.kind is projector (no fusion parameters)"),
        ]
    return checks


def _contrastive_checks(cfg: Config) -> list[tuple[bool, str]]:
    c = cfg.model.contrastive
    checks = [
        (0 < c.min_temperature <= c.init_temperature, "model.contrastive: need 0 < min_temperature <= init_temperature"),
        (c.text.dim % c.text.heads == 0, "model.contrastive.text.dim must be divisible by contrastive.text.heads"),
    ]
    for i, s in enumerate(cfg.train.stages):
        checks += [
            (s.lm_weight + s.contrastive_weight > 0, f"train.stages.{i}: lm_weight and contrastive_weight are both 0"),
            (s.contrastive_weight == 0 or c.dim > 0,
             f"train.stages.{i}.contrastive_weight > 0 needs an alignment head: set model.contrastive.dim"),
            ("contrastive" not in s.train or c.dim > 0,
             f"train.stages.{i}.train names 'contrastive' but model.contrastive.dim is 0 (no alignment head)"),
            (s.contrastive_weight == 0 or s.packing == "none",
             f"train.stages.{i}: contrastive_weight pairs each row with one caption; packing=shared_prefix "
             "puts many in a row: use packing=none"),
        ]
    return checks

"""Config: YAML round trips, dotted overrides, type checks and validation errors that name the field."""

import dataclasses

import pytest

from vitune.config import (
    Config,
    ConfigError,
    ModelConfig,
    StageConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
    to_dict,
    validate,
)
from vitune.presets import PRESETS, preset, tiny


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_yaml(tmp_path, name):
    cfg = preset(name)
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    loaded = load_yaml(path)
    assert loaded == cfg
    # tuples come back as tuples (not lists), so the loaded config is as hashable as the original
    assert isinstance(loaded.train.stages, tuple) and isinstance(loaded.model.vision.image_mean, tuple)
    assert hash(loaded) == hash(cfg)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*smol.*tiny"):
        preset("huge")


def test_yaml_reads_exponent_floats_and_ints_as_floats(tmp_path):
    # YAML 1.1 reads `3e-4` (no dot) as a string; the config must still make it a float
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stages:\n    - name: only\n      lr_lm: 3e-4\n      lr_connector: 1.5E-3\n"
                    "      epochs: 2\n      steps: 0\n")
    cfg = load_yaml(path)
    stage = cfg.train.stages[0]
    assert stage.lr_lm == 3e-4 and isinstance(stage.lr_lm, float)
    assert stage.lr_connector == 1.5e-3
    assert stage.epochs == 2.0 and isinstance(stage.epochs, float)
    assert stage.batch_size == StageConfig().batch_size  # unspecified fields keep their defaults
    assert cfg.model == ModelConfig()


def test_empty_yaml_is_the_default_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) == Config()


@pytest.mark.parametrize("text, match", [
    ("model:\n  vison: {}\n", r"c\.yaml\.model: unknown key\(s\) \['vison'\]; valid keys: .*'vision'"),
    ("model:\n  lm:\n    layers: 2.5\n", r"c\.yaml\.model\.lm\.layers: expected int, got 2\.5"),
    ("model:\n  lm:\n    tie_embeddings: 1\n", r"model\.lm\.tie_embeddings: expected bool, got 1"),
    ("model:\n  system_prompt: yes\n", r"model\.system_prompt: expected str, got True"),
    ("model:\n  vision: 3\n", r"model\.vision: expected a mapping, got 3"),
    ("model:\n  vision:\n    image_mean: [0.5, 0.5]\n", r"model\.vision\.image_mean: expected 3 values, got 2"),
    ("model:\n  vision:\n    image_std: [0.5, x, 0.5]\n", r"model\.vision\.image_std\.1: expected a number, got 'x'"),
    ("model:\n  vision:\n    image_std: 0.5\n", r"model\.vision\.image_std: expected a list"),
    ("train:\n  stages:\n    - train: [connector, brain]\n", r"train\.stages\.0\.train\.1: 'brain' is not one of"),
    ("train:\n  grad_clip: true\n", r"train\.grad_clip: expected a number, got True"),
    ("train: [1, 2\n", r"c\.yaml: malformed YAML"),
])
def test_bad_yaml_names_the_file_and_the_field(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_yaml(path)


def test_overrides_parse_values_as_yaml_and_leave_the_original_unchanged():
    base = tiny()
    cfg = apply_overrides(base, [
        "train.stages.1.steps=7", "train.stages.1.train=[connector]", "model.vision.image_mean=[0.1, 0.2, 0.3]",
        "model.system_prompt=Be brief.", "train.precision=bf16", "train.stages.0.lr_lm=2e-5",
        "model.lm.rope_theta=500000",
    ])
    assert cfg.train.stages[1].steps == 7 and cfg.train.stages[1].train == ("connector",)
    assert cfg.model.vision.image_mean == (0.1, 0.2, 0.3)
    assert cfg.model.system_prompt == "Be brief." and cfg.train.precision == "bf16"
    assert cfg.train.stages[0].lr_lm == 2e-5 and cfg.model.lm.rope_theta == 500000.0
    assert cfg.train.stages[0].steps == base.train.stages[0].steps  # other stages untouched
    assert base == tiny()  # frozen: the input config is not modified
    # the value may itself contain '=': only the first one splits key from value
    assert apply_overrides(base, ["model.system_prompt=a=b"]).model.system_prompt == "a=b"


def test_override_can_replace_a_whole_stage_list():
    cfg = apply_overrides(tiny(), ["train.stages=[{name: one, steps: 3, train: [lm]}]"])
    assert len(cfg.train.stages) == 1
    assert cfg.train.stages[0] == StageConfig(name="one", steps=3, train=("lm",))


@pytest.mark.parametrize("override, match", [
    ("train.stages.0.steps", r"expected key=value"),
    ("model.lmm.dim=3", r"unknown field 'lmm'"),
    ("model.lm.dim.x=3", r"unknown field 'x'"),
    ("train.stages.x.steps=1", r"'x' is not an index below 2"),
    ("train.stages.2=1", r"'2' is not an index below 2"),
    ("model.lm.dim=wide", r"config\.model\.lm\.dim: expected int, got 'wide'"),
    ("train.stages.0=3", r"train\.stages\.0: expected a mapping"),
])
def test_bad_overrides_fail_with_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(tiny(), [override])


@pytest.mark.parametrize("override, match", [
    ("model.vision.image_size=36", "image_size must be a multiple of patch_size"),
    ("model.vision.heads=3", "vision.width must be divisible by heads"),
    ("model.lm.kv_heads=3", "heads must be a multiple of kv_heads"),
    ("model.lm.max_seq_len=0", r"model\.lm\.max_seq_len must be >= 1, got 0"),
    ("train.stages=[]", "train.stages must not be empty"),
    ("train.stages.1.batch_size=0", r"train\.stages\.1\.batch_size must be >= 1, got 0"),
    ("train.stages.0.lr_lm=nan", r"config\.train\.stages\.0\.lr_lm: must be a finite number, got nan"),
    ("train.stages.0.lr_lm=.inf", r"lr_lm: must be a finite number, got inf"),
    ("train.stages.1.lr_connector=-1e-3", r"train\.stages\.1\.lr_connector must be >= 0, got -0\.001"),
    ("train.stages.0.steps=-5", r"train\.stages\.0\.steps must be >= 0, got -5"),
    ("model.lm.layers=-1", r"model\.lm\.layers must be >= 1, got -1"),
    ("model.lm.heads=0", r"model\.lm\.heads must be >= 1, got 0"),
    ("train.save_every=-1", r"train\.save_every must be >= 0, got -1"),
    ("train.grad_clip=nan", r"grad_clip: must be a finite number"),
    ("model.vision.image_std=[0.5, 0, 0.5]", r"model\.vision\.image_std must be > 0"),
    ("model.lora.dropout=1.0", r"model\.lora\.dropout must be in \[0, 1\)"),
    ("model.vision.feature_layer=7", r"feature_layer=7 names no hidden state"),
    ("train.stages.1.name=align", r"stage names must be unique"),
    ("train.stages.0.train=[]", r"train\.stages\.0\.train: name at least one part"),
    ("train.stages.1.mix_fraction=1.0", r"train\.stages\.1\.mix_fraction must be in \[0, 1\)"),
    ("model.lora.targets=[]", "model.lora"),
])
def test_validation_names_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(tiny(), [override])


def test_steps_or_epochs_must_be_set():
    with pytest.raises(ConfigError, match=r"train\.stages\.0: set steps or epochs"):
        apply_overrides(tiny(), ["train.stages.0.steps=0", "train.stages.0.epochs=0"])
    # epochs alone is enough
    assert apply_overrides(tiny(), ["train.stages.0.steps=0", "train.stages.0.epochs=0.5"]).train.stages[0].epochs == 0.5


def test_pretrained_tower_refuses_data_statistics():
    cfg = dataclasses.replace(tiny(), model=dataclasses.replace(
        tiny().model, vision=dataclasses.replace(tiny().model.vision, pretrained="some/folder", stats_from_data=True)))
    with pytest.raises(ConfigError, match="stats_from_data must be false for a pretrained tower"):
        validate(cfg)


def test_from_dict_accepts_dataclass_values_and_to_dict_inverts_it():
    cfg = tiny()
    assert from_dict(Config, to_dict(cfg)) == cfg
    assert from_dict(Config, {"model": cfg.model}) == Config(model=cfg.model)

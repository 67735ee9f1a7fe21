"""Checkpoints on disk: model folders (`model_folder`), `vitune merge` (`merge`) and exact-resume
training state (`training_state`): exact round trips, atomic replacement, pretrained parts left out
(`from_base`), and errors that name the folder or file at fault."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitune.checkpoints import model_folder
from vitune.checkpoints.merge import merge_folder
from vitune.checkpoints.model_folder import (
    FORMAT,
    load_pretrained,
    resolve_model_dir,
    save_pretrained,
)
from vitune.checkpoints.training_state import (
    Position,
    load_state,
    read_position,
    save_state,
)
from vitune.config import (
    Config,
    ConfigError,
    LoRAConfig,
    StageConfig,
    TrainConfig,
    load_yaml,
    to_dict,
)
from vitune.files import DataError
from vitune.model.lora import LoRALinear, is_lora_key
from vitune.model.vlm import VLM
from vitune.presets import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def model_cfg(tok, **lm):
    cfg = tiny().model
    return dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size, **lm))


def build(tok, seed=0, **changes):
    torch.manual_seed(seed)
    return VLM(dataclasses.replace(model_cfg(tok), **changes), tok.special.image)


def stages(*parts):
    return Config(tiny().model, TrainConfig(stages=(StageConfig(name="only", train=parts, steps=1),)))


def keys(folder, name="model.safetensors"):
    with safe_open(str(folder / name), "pt") as f:
        return set(f.keys())


def same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- model folders ----------------------------------------------------------------------------------

def test_save_then_load_is_exact(tok, tmp_path):
    model, cfg = build(tok), tiny()
    folder = save_pretrained(model, tok, tmp_path / "m", cfg)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "train_config.yaml"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == FORMAT and meta["image_token_id"] == tok.special.image
    assert meta["from_base"] == [] and meta["model"] == to_dict(model.cfg)
    assert load_yaml(folder / "train_config.yaml") == cfg
    loaded, tok2 = load_pretrained(folder)
    assert loaded.cfg == model.cfg and loaded.image_token_id == model.image_token_id
    assert same_state(loaded, model) and not loaded.training
    assert tok2.encode("<image> a red circle") == tok.encode("<image> a red circle")


def test_a_training_output_folder_resolves_to_its_model(tok, tmp_path):
    save_pretrained(build(tok), tok, tmp_path / "run" / "model")
    assert resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "model"
    assert resolve_model_dir(tmp_path / "run" / "model") == tmp_path / "run" / "model"
    with pytest.raises(FileNotFoundError, match=r"empty: not a vitune model folder \(no config.json\)"):
        resolve_model_dir(tmp_path / "empty")


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_head_is_stored_once(tok, tmp_path, tied):
    cfg = model_cfg(tok, tie_embeddings=tied)
    folder = save_pretrained(VLM(cfg, tok.special.image), tok, tmp_path / "m")
    assert "lm.embed_tokens.weight" in keys(folder)
    assert ("lm.lm_head.weight" in keys(folder)) is not tied


def test_saving_over_a_folder_replaces_it_whole(tok, tmp_path):
    folder = save_pretrained(build(tok, seed=1), tok, tmp_path / "m")
    (folder / "stale.bin").write_bytes(b"old")
    model = build(tok, seed=2)
    save_pretrained(model, tok, folder)
    assert not (folder / "stale.bin").exists() and leftovers(tmp_path) == []
    assert same_state(load_pretrained(folder)[0], model)


def test_a_failed_save_leaves_the_old_folder_intact(tok, tmp_path):
    old = build(tok, seed=1)
    save_pretrained(old, tok, tmp_path / "m")

    class BrokenTokenizer:
        def save(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(build(tok, seed=2), BrokenTokenizer(), tmp_path / "m")
    assert leftovers(tmp_path) == []  # no half-written temporary folder
    assert same_state(load_pretrained(tmp_path / "m")[0], old)


def corrupt_config(folder):
    (folder / "config.json").write_text("{not json")


def truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage, error, message", [
    (lambda f: (f / "model.safetensors").unlink(), FileNotFoundError, "m/model.safetensors"),
    (lambda f: (f / "tokenizer.json").unlink(), FileNotFoundError, "m: no tokenizer.json"),
    (lambda f: (f / "config.json").write_text(json.dumps({"format": "gguf"})), ValueError,
     "m/config.json: format 'gguf' is not 'vitune-vlm'"),
    pytest.param(corrupt_config, DataError, "m/config.json: corrupt or unreadable"),
    pytest.param(truncate_weights, DataError, "m/model.safetensors: corrupt or unreadable"),
], ids=["no-weights", "no-tokenizer", "wrong-format", "corrupt-config", "truncated-weights"])
def test_damaged_folders_fail_naming_the_file(tok, tmp_path, damage, error, message):
    folder = save_pretrained(build(tok), tok, tmp_path / "m")
    damage(folder)
    with pytest.raises(error, match=message):
        load_pretrained(folder)


def test_a_bad_model_field_in_config_json_is_named(tok, tmp_path):
    folder = save_pretrained(build(tok), tok, tmp_path / "m")
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["lm"]["layerz"] = 3
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"m/config.json:model.*unknown key\(s\) \['layerz'\]"):
        load_pretrained(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("connector.linear_1.bias"), r"Missing key\(s\).*connector.linear_1.bias"),
    (lambda s: s.update(extra=torch.zeros(1)), r"Unexpected key\(s\).*extra"),
])
def test_weights_load_strictly(tok, tmp_path, edit, message):
    folder = save_pretrained(build(tok), tok, tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(DataError, match=r"(?s)m/model.safetensors: corrupt or unreadable.*" + message):
        load_pretrained(folder)


def test_untrained_pretrained_parts_come_from_their_source(tok, tmp_path, monkeypatch):
    """An LM that starts from a source and that no stage trains is left out; loading asks its source."""
    model = build(tok, seed=3, lm_pretrained="some-source", lora=LoRAConfig(rank=2))
    with torch.no_grad():
        for m in model.lm.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    folder = save_pretrained(model, tok, tmp_path / "m", stages("connector", "lora"))
    assert json.loads((folder / "config.json").read_text())["from_base"] == ["lm"]
    lm_keys = {k for k in keys(folder) if k.startswith("lm.")}
    assert lm_keys and all(is_lora_key(k) for k in lm_keys)  # adapters only
    assert {k for k in keys(folder) if not k.startswith("lm.")} == {
        k for k in model.state_dict() if not k.startswith("lm.")}
    asked = []
    base = {k: v for k, v in model.state_dict().items() if k.startswith("lm.") and not is_lora_key(k)}
    monkeypatch.setattr(model_folder, "base_state", lambda cfg, parts: asked.append(parts) or base)
    assert same_state(load_pretrained(folder)[0], model) and asked == [("lm",)]
    # a stage that trains the LM stores it whole
    full = save_pretrained(model, tok, tmp_path / "full", stages("connector", "lm"))
    assert keys(full) == set(model.state_dict())


# -- merge -------------------------------------------------------------------------------------------

def test_merge_folds_adapters_into_a_standalone_folder(tok, tmp_path):
    model = build(tok, seed=4, lora=LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for m in model.lm.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.1)
    q = model.lm.layers[0].self_attn.q_proj
    want_q = q.weight + 2.0 * q.lora_B @ q.lora_A  # scale = alpha / rank
    save_pretrained(model, tok, tmp_path / "run" / "model")
    out = merge_folder(tmp_path / "run", tmp_path / "merged")  # a training output folder is accepted
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["lora"]["rank"] == 0 and meta["from_base"] == []
    assert not any(is_lora_key(k) for k in keys(out))
    merged, _ = load_pretrained(out)
    assert torch.allclose(merged.lm.layers[0].self_attn.q_proj.weight, want_q, atol=1e-6)
    x, pos = torch.randn(1, 6, model.cfg.lm.dim), torch.arange(6)[None]
    with torch.no_grad():
        assert torch.allclose(model.eval().lm(x, pos), merged.lm(x, pos), atol=1e-5)


def test_merge_refuses_a_model_without_adapters(tok, tmp_path):
    save_pretrained(build(tok), tok, tmp_path / "m")
    with pytest.raises(ValueError, match=r"m: the model has no LoRA adapters to merge \(model.lora.rank is 0\)"):
        merge_folder(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- training state ----------------------------------------------------------------------------------

def trained(tok, steps=2, seed=5):
    """A model and AdamW after `steps` optimizer steps on a toy objective."""
    model = build(tok, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        step(model, opt)
    return model, opt


def step(model, opt):
    x = torch.randn(1, 5, model.cfg.lm.dim, generator=torch.Generator().manual_seed(0))
    loss = model.lm(x, torch.arange(5)[None]).pow(2).mean() + sum(p.pow(2).sum() for p in model.connector.parameters())
    loss.backward()
    opt.step()
    opt.zero_grad()


def draws():
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_state_round_trip_resumes_exactly(tok, tmp_path):
    model, opt = trained(tok)
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    pos = Position(stage=1, step=2, global_step=6)
    save_state(tmp_path / "state", model, opt, pos, tok, tiny())
    after_save = draws()
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "config.yaml", "data.json", "model.safetensors", "optimizer.pt", "rng.pt", "tokenizer.json",
        "trainer.json"]
    assert json.loads((tmp_path / "state" / "trainer.json").read_text()) == {"stage": 1, "step": 2, "global_step": 6}
    assert load_yaml(tmp_path / "state" / "config.yaml") == tiny()

    fresh = build(tok, seed=99)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert load_state(tmp_path / "state", fresh, fresh_opt) == pos == read_position(tmp_path / "state")
    assert draws() == after_save  # torch, python and numpy RNGs all restored
    assert same_state(fresh, model)
    a, b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    step(model, opt), step(fresh, fresh_opt)  # the next step is the same step
    assert same_state(fresh, model)


def test_state_that_does_not_fit_the_model_names_the_keys(tok, tmp_path):
    model, opt = trained(tok, steps=0)
    save_state(tmp_path / "state", model, opt, Position(), tok, tiny())
    deeper = VLM(model_cfg(tok, layers=3), tok.special.image)
    with pytest.raises(ValueError, match=r"state: state does not fit the model: missing \['lm.layers.2.*unexpected \[\]"):
        load_state(tmp_path / "state", deeper, None)
    shallower = VLM(model_cfg(tok, layers=1), tok.special.image)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['lm.layers.1"):
        load_state(tmp_path / "state", shallower, None)


def test_state_leaves_out_untrained_pretrained_parts(tok, tmp_path):
    model = build(tok, seed=6, lm_pretrained="some-source", lora=LoRAConfig(rank=2))
    opt = torch.optim.AdamW(model.connector.parameters())
    save_state(tmp_path / "state", model, opt, Position(), tok, stages("connector", "lora"))
    lm_keys = {k for k in keys(tmp_path / "state") if k.startswith("lm.")}
    assert lm_keys and all(is_lora_key(k) for k in lm_keys)
    fresh = build(tok, seed=7, lm_pretrained="some-source", lora=LoRAConfig(rank=2))
    base_before = {k: v.clone() for k, v in fresh.lm.state_dict().items() if not is_lora_key(k)}
    load_state(tmp_path / "state", fresh, None)  # the base LM is not missing: it comes from its source
    assert all(torch.equal(fresh.lm.state_dict()[k], v) for k, v in base_before.items())
    assert all(torch.equal(fresh.state_dict()[k], model.state_dict()[k]) for k in lm_keys)
    state = load_file(str(tmp_path / "state" / "model.safetensors"))
    del state[next(iter(sorted(lm_keys)))]
    save_file(state, str(tmp_path / "state" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['lm.layers.0.*lora_A'\]"):  # adapters are never from a source
        load_state(tmp_path / "state", fresh, None)


def test_a_failed_state_save_keeps_the_previous_state(tok, tmp_path):
    model, opt = trained(tok, steps=1)
    save_state(tmp_path / "state", model, opt, Position(0, 1, 1), tok, tiny())

    class BrokenTokenizer:
        def save(self, folder):
            raise KeyboardInterrupt  # killed mid-save

    with pytest.raises(KeyboardInterrupt):
        save_state(tmp_path / "state", model, opt, Position(0, 2, 2), BrokenTokenizer(), tiny())
    assert read_position(tmp_path / "state") == Position(0, 1, 1) and leftovers(tmp_path) == []


@pytest.mark.parametrize("damage, message", [
    (lambda s: (s / "rng.pt").unlink(), "state/rng.pt"),
    (lambda s: (s / "optimizer.pt").unlink(), "state/optimizer.pt"),
    pytest.param(lambda s: (s / "trainer.json").write_text('{"stage": 1'), "trainer.json"),
    pytest.param(lambda s: (s / "optimizer.pt").write_bytes(b"PK\x03\x04 cut"), "optimizer.pt"),
], ids=["no-rng", "no-optimizer", "corrupt-trainer-json", "truncated-optimizer"])
def test_damaged_state_fails_naming_the_file(tok, tmp_path, damage, message):
    model, opt = trained(tok, steps=1)
    save_state(tmp_path / "state", model, opt, Position(0, 1, 1), tok, tiny())
    damage(tmp_path / "state")
    with pytest.raises(Exception, match=message):
        load_state(tmp_path / "state", build(tok), torch.optim.AdamW(build(tok).parameters()))

"""LoRA as one artifact: adapters on a pretrained LM (a tiny random HF Llama, hermetic), a model
folder that stores only what changed and loads in one call, and `vitune merge`, whose standalone
folder gives the same logits (fp32, <= 1e-4) and the same greedy generation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from tiny_hf import write_tiny_llama

from vitune.checkpoints.model_folder import load_pretrained, save_pretrained
from vitune.cli import main
from vitune.config import ConfigError, apply_overrides
from vitune.data.chat import Message, render
from vitune.data.tokenizer import IMAGE_SLOT
from vitune.inference.generate import GenerationConfig, generate
from vitune.model.lora import LoRALinear, is_lora_key, merge_lora
from vitune.presets import tiny
from vitune.training.train import build_model, build_tokenizer, train

pytest.importorskip("transformers")
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def lora_config(base, *extra):
    return apply_overrides(tiny(), [
        f"model.lm_pretrained={base}", "model.lora.rank=4", "model.lora.alpha=8",
        "train.stages.0.train=[connector]", "train.stages.0.steps=2",
        "train.stages.1.train=[connector,lora]", "train.stages.1.steps=3", "train.stages.1.lr_lora=0.01", *extra])


def inputs(model, tok, seed=0):
    """One image + a question, rendered as a generation prompt."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size, generator=g)
    ids = render(tok, [Message("user", f"{IMAGE_SLOT}\nwhat shape is it?")], "chatml", model.n_image_tokens,
                 add_generation_prompt=True).input_ids
    return ids, pixels


@torch.inference_mode()
def logits(model, ids, pixels):
    x = torch.tensor([ids])
    hidden = model.lm(model.embed_inputs(x, pixels), torch.arange(len(ids))[None])
    return model.lm.logits(hidden)


def greedy(model, tok, ids, pixels, n=12):
    gen = GenerationConfig(max_new_tokens=n)
    return generate(model.eval(), [ids], pixels, gen, set(), tok.decode, tok.special.eos).token_ids[0]


def test_lora_wraps_targets_and_starts_as_identity(base):
    cfg = lora_config(base)
    tok = build_tokenizer(cfg, [])
    model = build_model(cfg, tok)
    wrapped = [m for m in model.lm.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 7 * model.cfg.lm.layers
    assert tok.special.image >= model.cfg.lm.vocab_size  # `<image>` lies past the pretrained table
    plain = build_model(apply_overrides(cfg, ["model.lora.rank=0", "train.stages.1.train=[connector]"]), tok)
    plain.connector.load_state_dict(model.connector.state_dict())
    plain.vision.load_state_dict(model.vision.state_dict())
    ids, pixels = inputs(model, tok)
    assert torch.equal(logits(model.eval(), ids, pixels), logits(plain.eval(), ids, pixels))  # B = 0


def test_merged_equals_unmerged(base):
    cfg = lora_config(base)
    tok = build_tokenizer(cfg, [])
    model = build_model(cfg, tok).eval()
    with torch.no_grad():
        for m in model.lm.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.2)
    merged = merge_lora(copy.deepcopy(model))
    assert merged.cfg.lora.rank == 0 and not any(isinstance(m, LoRALinear) for m in merged.modules())
    ids, pixels = inputs(model, tok)
    a, b = logits(model, ids, pixels), logits(merged, ids, pixels)
    assert (a - b).abs().max() <= TOL
    assert (a - logits(build_model(cfg, tok).eval(), ids, pixels)).abs().max() > 1e-2  # adapters matter
    assert greedy(model, tok, ids, pixels) == greedy(merged, tok, ids, pixels)


@pytest.fixture(scope="module")
def trained(base, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    data = {"align": str(shapes_dir / "align.json"), "instruct": str(shapes_dir / "instruct.json")}
    return train(lora_config(base), data, out, progress=False, log=lambda s: None).model


def stored_keys(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_lora_folder_is_small_and_loads_in_one_call(trained, base):
    meta = json.loads((trained / "config.json").read_text())
    assert meta["from_base"] == ["lm"] and meta["model"]["lm_pretrained"] == str(base)
    keys = stored_keys(trained)
    lm_keys = {k for k in keys if k.startswith("lm.")}
    assert lm_keys and all(is_lora_key(k) for k in lm_keys)  # adapters only, no base weights
    assert any(k.startswith("connector.") for k in keys)
    model, _ = load_pretrained(trained)  # base from lm_pretrained + the stored tensors, strictly
    assert any(m.lora_B.abs().sum() > 0 for m in model.lm.modules() if isinstance(m, LoRALinear))


def test_merge_cli_gives_standalone_folder_with_same_outputs(trained, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(trained), str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["from_base"] == [] and meta["model"]["lora"]["rank"] == 0
    assert not any(is_lora_key(k) for k in stored_keys(out)) and "lm.layers.0.mlp.up_proj.weight" in stored_keys(out)
    assert (out / "model.safetensors").stat().st_size > 2 * (trained / "model.safetensors").stat().st_size
    a_model, tok = load_pretrained(trained)
    b_model, _ = load_pretrained(out)
    ids, pixels = inputs(a_model, tok, seed=3)
    assert (logits(a_model, ids, pixels) - logits(b_model, ids, pixels)).abs().max() <= TOL
    assert greedy(a_model, tok, ids, pixels) == greedy(b_model, tok, ids, pixels)
    assert main(["merge", str(out), str(tmp_path / "again")]) == 2  # nothing to merge: a clear error


def test_full_finetune_stores_every_tensor(base, tmp_path):
    cfg = lora_config(base, "train.stages.1.train=[connector,lm]", "model.lora.rank=0")
    tok = build_tokenizer(cfg, [])
    model = build_model(cfg, tok)
    folder = save_pretrained(model, tok, tmp_path / "m", cfg)
    assert json.loads((folder / "config.json").read_text())["from_base"] == []
    assert stored_keys(folder) == set(model.state_dict())


def test_lora_stage_without_adapters_is_refused(base):
    with pytest.raises(ConfigError, match="names 'lora' but model.lora.rank is 0"):
        lora_config(base, "model.lora.rank=0")



def test_lora_run_resumes_exactly_from_a_state_without_base_weights(trained, base, shapes_dir, tmp_path):
    from vitune.training.metrics_log import read_metrics

    data = {"align": str(shapes_dir / "align.json"), "instruct": str(shapes_dir / "instruct.json")}
    quiet = {"progress": False, "log": lambda s: None}
    train(lora_config(base), data, tmp_path, stop_after=3, **quiet)
    assert all(is_lora_key(k) for k in stored_keys(tmp_path / "state") if k.startswith("lm."))
    train(lora_config(base), data, tmp_path, resume=True, **quiet)
    losses = [[r["loss"] for r in read_metrics(out / "metrics.jsonl")] for out in (tmp_path, trained.parent)]
    assert losses[0] == losses[1] and len(losses[0]) == 5


def test_text_only_chat_and_self_distilled_records(trained, base, capsys):
    from vitune.data.llava import parse_record
    from vitune.inference.text_chat import self_distill

    assert main(["chat", "--model", str(trained), "--max-new-tokens", "4", "hello"]) == 0  # no --image
    records, unfinished = self_distill(str(base), prompts=("hello", "what is a cat?", "name a color"),
                                       max_new_tokens=6, batch_size=2)
    assert len(records) + unfinished == 3
    for i, r in enumerate(records):
        conv = parse_record(r, i, "text_chat.json", trained)
        assert conv.images == () and [m.role for m in conv.messages] == ["user", "assistant"]

"""Weight-only quantisation (model/quant.py, checkpoints/quantized.py) on tiny random models, and
the incremental text decoding of `generate`.

- a quantised linear equals its dequantised reference (kernel path and prefill path), and the
  dequantised weight is within half a quantisation step of the float weight;
- greedy decisions of int8 / int4 follow fp32's, by this rule: teacher-forced on fp32's greedy path,
  int8's logits stay within 0.05 of fp32's (int4: 0.6) and its argmax is fp32's token at every step
  where fp32's top-2 margin is at least twice that, and at >= 90 % of all steps (int4: >= 75 %);
- save -> load gives bit-identical logits; every bad input is refused with the field or tensor named.
"""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vitune.inference.generate as G
import vitune.model.quant as Q
from vitune.checkpoints.model_folder import load_pretrained, save_pretrained
from vitune.checkpoints.quantized import QUANT_FORMAT, load_model, load_quantized, quantize_folder, save_quantized
from vitune.config import ConfigError, LoRAConfig
from vitune.files import DataError
from vitune.inference.generate import GenerationConfig, generate
from vitune.model.quant import QuantConfig, QuantLinear, QuantLoRALinear, dequantize_lm, quantize_lm, quantized_layers
from vitune.model.vlm import VLM
from vitune.presets import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEMES = [QuantConfig(8), QuantConfig(4, 32), QuantConfig(4, 64)]
PROMPTS = ("What colour is it?", "hello", "a b c d", "The quick brown fox")


def tiny_vlm(tok, seed=0, spread=0.05, **lm_changes) -> VLM:
    torch.manual_seed(seed)
    cfg = tiny().model
    lora = lm_changes.pop("lora", cfg.lora)
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size, **lm_changes), lora=lora)
    model = VLM(cfg, tok.special.image).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
    return model


def quantized(model: VLM, cfg: QuantConfig) -> VLM:
    q = copy.deepcopy(model)
    quantize_lm(q.lm, cfg)
    return q


@torch.no_grad()
def path_logits(model: VLM, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    embeds, _ = model.prepare(x, None, None, pos)
    return model.lm.logits(model.lm(embeds, pos))[0].float()  # (T, V)


# --- the config and the layers it can take ------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    ({"bits": 3}, "quantization.bits must be 8 or 4, got 3"),
    ({"bits": 8.0}, "quantization.bits must be 8 or 4, got 8.0"),
    ({"bits": 8, "group_size": 32}, "quantization.group_size applies to bits=4 only"),
    ({"bits": 4, "group_size": 48}, r"quantization.group_size must be one of \[32, 64, 128, 256\]"),
])
def test_config_refuses_bad_fields(kw, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kw)


def test_int4_defaults_to_groups_of_32():
    assert QuantConfig(4).group_size == 32 and QuantConfig(8).group_size is None


def test_a_group_size_that_does_not_divide_a_layer_names_it_and_changes_nothing(tok):
    model = tiny_vlm(tok)  # dim 64: groups of 128 do not fit
    with pytest.raises(ConfigError, match=r"lm.layers.0.self_attn.q_proj: in_features 64 is not a multiple of "
                                          r"quantization.group_size 128; choose one of \[32, 64\]"):
        quantize_lm(model.lm, QuantConfig(4, 128))
    assert not quantized_layers(model)


def test_int8_refuses_in_features_the_kernel_cannot_take():
    with pytest.raises(ConfigError, match="proj: in_features 40 is not a multiple of 16"):
        QuantLinear.from_weight(torch.randn(16, 40), None, QuantConfig(8), "proj")


def test_non_finite_weights_are_refused():
    w = torch.randn(16, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ConfigError, match="proj: the weight holds NaN"):
        QuantLinear.from_weight(w, None, QuantConfig(8), "proj")


def on_int4_grid(model: VLM, cfg: QuantConfig) -> VLM:
    """The LM's linear weights replaced by their int4 round trip: a base that is 4-bit already, as the
    packaged SmolLM2 (Q4_1, groups of 32) is."""
    from vitune.model.lora import LoRALinear
    with torch.no_grad():
        for module in model.lm.modules():
            if isinstance(module, (torch.nn.Linear, LoRALinear, torch.nn.Embedding)):  # (the tied head)
                module.weight.copy_(QuantLinear.from_weight(module.weight, None, cfg).dequantize())
    return model


def lora_vlm(tok, spread: float) -> VLM:
    model = tiny_vlm(tok, lora=LoRAConfig(rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, spread)  # adapters that change the answers
    return model


def test_lora_adapters_stay_in_float_over_the_quantised_base(tok):
    """The fault this guards against: on a base already on the int4 grid, merging small adapters
    before quantising rounds the merged weight back onto the base's grid, erasing the tuning."""
    cfg = QuantConfig(4, 32)
    model = lora_vlm(tok, spread=0.003)  # changes of about a quarter of an int4 step
    on_int4_grid(model, cfg)
    base_only = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in base_only.named_parameters():
            if "lora_B" in name:
                p.zero_()
    kept = quantized(model, cfg)
    layers = quantized_layers(kept.lm)
    assert isinstance(layers["layers.0.self_attn.q_proj"], Q.QuantLoRALinear) and len(layers) == 7 * 2 + 1
    from vitune.model.lora import merge_lora
    merged = quantized(merge_lora(copy.deepcopy(model)), cfg)
    ids = tok.encode(PROMPTS[3])
    want, without = path_logits(model, ids), path_logits(base_only, ids)
    tuning = (want - without).abs().max()
    assert tuning > 0.05  # the adapters matter
    assert (path_logits(kept, ids) - want).abs().max() < 0.2 * tuning
    assert (path_logits(merged, ids) - want).abs().max() > 0.5 * tuning  # merged: the tuning is lost


@pytest.mark.parametrize("rows", [1, 100])
def test_a_quantised_lora_layer_matches_its_dequantised_reference(rows):
    from vitune.model.lora import LoRALinear
    torch.manual_seed(1)
    layer = LoRALinear(torch.nn.Linear(64, 48), LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    q = Q.QuantLoRALinear.from_lora(layer, QuantConfig(8), "proj")
    x = torch.randn(rows, 64)
    ref = F.linear(x.bfloat16().float(), q.base_weight() + layer.delta(), layer.bias)
    assert (q(x) - ref).abs().max() <= 0.01 * ref.abs().max()
    assert torch.allclose(q.dequantize(), q.base_weight() + layer.delta())
    assert "LoRA rank 4" in repr(q)


# --- one layer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.name)
@pytest.mark.parametrize("rows", [1, 5, 100])  # 100 > KERNEL_MAX_ROWS: the dequantise + dense path
def test_linear_matches_its_dequantised_reference(cfg, rows):
    torch.manual_seed(0)
    w, b = torch.randn(40, 256) * 0.05, torch.randn(40)  # 40 outputs: int4 pads to 48 rows inside
    layer = QuantLinear.from_weight(w, b, cfg)
    x = torch.randn(rows, 256)
    ref = F.linear(x.bfloat16().float(), layer.dequantize(), b)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 40)
    assert (y - ref).abs().max() <= 0.01 * ref.abs().max()
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert layer(x.view(rows, 1, 256)).shape == (rows, 1, 40)


@pytest.mark.parametrize("cfg", SCHEMES[:2], ids=lambda c: c.name)
def test_quantising_and_packing_in_row_chunks_changes_nothing(monkeypatch, cfg):
    torch.manual_seed(2)
    w, x = torch.randn(300, 64), torch.randn(3, 64)  # 300 rows: chunks of 128, 128, 44 (+ 4 padding rows)
    whole = QuantLinear.from_weight(w, None, cfg)
    monkeypatch.setattr(Q, "ROW_CHUNK", 128)
    chunked = QuantLinear.from_weight(w, None, cfg)
    assert torch.equal(chunked.qweight, whole.qweight) and torch.equal(chunked.scales, whole.scales)
    assert torch.equal(chunked(x), whole(x))


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.name)
def test_dequantised_weight_is_within_half_a_step(cfg):
    torch.manual_seed(1)
    w = torch.randn(32, 128) * 0.05
    w[0] = 0.0  # a zero row and a constant group are represented exactly
    w[1, :64] = 0.25
    layer = QuantLinear.from_weight(w, None, cfg)
    err = (layer.dequantize() - w).abs()
    if cfg.bits == 8:
        step = layer.scales.float()[:, None]
    else:
        step = layer.scales.float().repeat_interleave(cfg.group_size, dim=1)
    assert bool((err <= step / 2 * 1.01 + 1e-6).all())
    assert err[0].max() == 0 and (cfg.bits == 8 or err[1, :64].max() == 0)


def test_a_quantised_layer_has_no_float_weight_and_survives_casts():
    layer = QuantLinear.from_weight(torch.randn(32, 64), None, QuantConfig(4))
    with pytest.raises(AttributeError, match="weight-only quantised .int4 .groups of 32..: it has no float weight"):
        layer.weight
    x = torch.randn(2, 64)
    before = layer(x)
    layer.double()  # floating buffers are cast; the kernels still get bf16 scales
    assert torch.equal(layer.float()(x), before)


# --- the LM -----------------------------------------------------------------------------------------

def test_a_tied_head_is_quantised_as_a_copy_and_the_embedding_kept(tok):
    model = tiny_vlm(tok)
    table = model.lm.embed_tokens.weight.clone()
    q = quantized(model, QuantConfig(8))
    assert isinstance(q.lm.lm_head, QuantLinear) and torch.equal(q.lm.embed_tokens.weight, table)
    assert len(quantized_layers(q.lm)) == 7 * model.cfg.lm.layers + 1
    ids = tok.encode(PROMPTS[0])
    reference = _swap_lm(q, dequantize_lm(copy.deepcopy(q.lm)))  # float linears holding the same weights
    assert isinstance(reference.lm.lm_head, torch.nn.Linear)
    assert (path_logits(q, ids) - path_logits(reference, ids)).abs().max() < 0.05
    with pytest.raises(AttributeError, match="lm.lm_head is weight-only quantised"):
        q.lm.head_weight()  # training through a quantised head is refused


def _swap_lm(model: VLM, lm) -> VLM:
    other = copy.deepcopy(model)
    other.lm = lm
    return other


@pytest.mark.parametrize("cfg,max_err,min_agree", [(QuantConfig(8), 0.05, 0.9), (QuantConfig(4), 0.6, 0.75)],
                         ids=["int8", "int4"])
def test_greedy_decisions_follow_fp32(tok, cfg, max_err, min_agree):
    model = tiny_vlm(tok, qkv_bias=True)
    q = quantized(model, cfg)
    prompts = [tok.encode(p) for p in PROMPTS]
    ref = generate(model, prompts, None, GenerationConfig(max_new_tokens=24), set(), tok.decode, tok.special.eos)
    agree = total = 0
    for prompt, answer in zip(prompts, ref.token_ids):
        a, b = (path_logits(m, prompt + answer)[len(prompt) - 1:-1] for m in (model, q))  # (24, V)
        assert (a - b).abs().max() <= max_err
        top = a.topk(2, dim=-1).values
        clear = top[:, 0] - top[:, 1] >= 2 * max_err  # no error within the bound could flip these
        picks = b.argmax(-1) == torch.tensor(answer)
        assert bool(picks[clear].all())
        agree, total = agree + int(picks.sum()), total + len(answer)
    assert agree >= min_agree * total


def test_a_quantised_model_generates_in_batches_and_casts_to_bf16(tok):
    q = quantized(tiny_vlm(tok), QuantConfig(8))
    prompts = [tok.encode(p) for p in PROMPTS]  # 4 rows, left-padded: the prefill takes the dense path
    out = generate(q, prompts, None, GenerationConfig(max_new_tokens=6), set(), tok.decode, tok.special.eos)
    assert [len(t) for t in out.token_ids] == [6] * 4
    fp32_rest = path_logits(q, prompts[0])
    bf16_rest = path_logits(q.to(torch.bfloat16), prompts[0])  # the quantised weights and scales survive the cast
    assert (bf16_rest - fp32_rest).abs().max() < 0.1


# --- folders ----------------------------------------------------------------------------------------

@pytest.fixture
def float_folder(tok, tmp_path):
    return save_pretrained(tiny_vlm(tok), tok, tmp_path / "float")


@pytest.mark.parametrize("cfg", SCHEMES[:2], ids=lambda c: c.name)
def test_save_then_load_gives_identical_outputs(tok, tmp_path, cfg):
    q = quantized(tiny_vlm(tok), cfg)
    folder = save_quantized(q, tok, tmp_path / "q")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == QUANT_FORMAT and meta["quantization"]["format_version"] == 2
    assert meta["quantization"]["bits"] == cfg.bits and meta["quantization"]["group_size"] == cfg.group_size
    back, tok2 = load_quantized(folder)
    ids = tok.encode(PROMPTS[0])
    assert torch.equal(path_logits(back, ids), path_logits(q, ids))
    prompts = [tok.encode(p) for p in PROMPTS]
    gen = GenerationConfig(max_new_tokens=8)
    assert generate(back, prompts, None, gen, set(), tok2.decode, tok2.special.eos).token_ids == \
        generate(q, prompts, None, gen, set(), tok.decode, tok.special.eos).token_ids


def test_a_reader_without_quantisation_refuses_the_folder(tok, tmp_path):
    folder = save_quantized(quantized(tiny_vlm(tok), QuantConfig(8)), tok, tmp_path / "q")
    with pytest.raises(DataError, match="format 'vitune-vlm-quantized' is not 'vitune-vlm'"):
        load_pretrained(folder)


def _edit_record(folder, **changes):
    path = folder / "config.json"
    meta = json.loads(path.read_text())
    meta["quantization"].update(changes)
    path.write_text(json.dumps(meta))


def _edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


@pytest.mark.parametrize("edit,message", [
    (lambda f: _edit_record(f, format_version=3), "quantization.format_version 3 is not one this vitune reads"),
    (lambda f: _edit_record(f, bits=3), "quantization.bits must be 8 or 4, got 3"),
    (lambda f: _edit_record(f, layers=["layers.0.self_attn.q_proj"]), "quantization.layers does not list"),
    (lambda f: _edit_tensors(f, lambda s: s.pop("lm.layers.1.mlp.up_proj.scales")),
     "tensor 'lm.layers.1.mlp.up_proj.scales' is missing"),
    (lambda f: _edit_tensors(f, lambda s: s.update({"lm.lm_head.qweight": s["lm.lm_head.qweight"][:, :16].clone()})),
     r"tensor 'lm.lm_head.qweight' is torch.uint8 \(260, 16\), expected torch.uint8 \(260, 32\)"),
    (lambda f: _edit_tensors(f, lambda s: s.update({"lm.layers.0.mlp.down_proj.scales":
                                                    s["lm.layers.0.mlp.down_proj.scales"].float()})),
     "tensor 'lm.layers.0.mlp.down_proj.scales' is torch.float32"),
], ids=["version", "bits", "layers", "missing-scales", "shape", "dtype"])
def test_the_loader_refuses_a_bad_folder_naming_the_field_or_tensor(tok, tmp_path, edit, message):
    folder = save_quantized(quantized(tiny_vlm(tok), QuantConfig(4, 32)), tok, tmp_path / "q")
    edit(folder)
    with pytest.raises(DataError, match=message):
        load_quantized(folder)


def test_quantize_folder_and_load_model(tok, tmp_path, float_folder):
    out = quantize_folder(float_folder, tmp_path / "q8", bits=8)
    stored, _ = load_model(out)
    on_load, _ = load_model(float_folder, quantize=QuantConfig(8))
    plain, _ = load_model(float_folder)
    ids = tok.encode(PROMPTS[1])
    assert torch.equal(path_logits(stored, ids), path_logits(on_load, ids))
    assert not quantized_layers(plain)
    with pytest.raises(ConfigError, match="quantised already .int8.; drop --quantize"):
        load_model(out, quantize=QuantConfig(4))
    with pytest.raises(DataError, match="quantised already; quantise its float source"):
        quantize_folder(out, tmp_path / "again", bits=4)
    with pytest.raises(DataError, match="exists and is not empty; pass --overwrite"):
        quantize_folder(float_folder, out, bits=8)
    with pytest.raises(ConfigError, match="quantization.bits must be 8 or 4"):
        quantize_folder(float_folder, tmp_path / "bad", bits=2)


def test_quantize_folder_keeps_lora_adapters_or_merges_them_when_asked(tok, tmp_path):
    model = lora_vlm(tok, spread=0.05)
    src = save_pretrained(model, tok, tmp_path / "lora")
    ids = tok.encode(PROMPTS[2])
    got, _ = load_model(quantize_folder(src, tmp_path / "q", bits=4))
    assert got.cfg.lora.rank == 4 and isinstance(quantized_layers(got.lm)["layers.1.mlp.down_proj"], Q.QuantLoRALinear)
    assert torch.equal(path_logits(got, ids), path_logits(quantized(model, QuantConfig(4)), ids))
    on_load, _ = load_model(src, quantize=QuantConfig(4))
    assert torch.equal(path_logits(on_load, ids), path_logits(got, ids))
    merged, _ = load_model(quantize_folder(src, tmp_path / "m", bits=8, merge_adapters=True))
    assert merged.cfg.lora.rank == 0
    from vitune.model.lora import merge_lora
    want = quantized(merge_lora(copy.deepcopy(model)), QuantConfig(8))
    assert torch.equal(path_logits(merged, ids), path_logits(want, ids))


def test_a_version_1_folder_loads_and_one_with_adapters_is_refused(tok, tmp_path):
    folder = save_quantized(quantized(tiny_vlm(tok), QuantConfig(8)), tok, tmp_path / "v1")
    _edit_record(folder, format_version=1)  # what vitune wrote before adapters were kept
    load_quantized(folder)
    lora = save_quantized(quantized(lora_vlm(tok, 0.05), QuantConfig(8)), tok, tmp_path / "v1-lora")
    _edit_record(lora, format_version=1)
    with pytest.raises(DataError, match="model.lora.rank is 4; a format_version 1 folder holds merged weights"):
        load_quantized(lora)


# --- generate's incremental decoding == the full re-decode it replaced ------------------------------

def old_generate_texts(tokens: list[int], decode, stops: tuple[str, ...]) -> tuple[str, list[str]]:
    """The former loop: the whole answer re-decoded every step; returns (text, texts seen per step)."""
    out, seen = [], []
    for t in tokens:
        out.append(t)
        text = decode(out)
        hit = [text.index(s) for s in stops if s in text]
        if hit:
            seen.append(text[:min(hit)])
            return text[:min(hit)], seen
        seen.append(text)
    return text, seen


@pytest.mark.parametrize("text,stops", [
    ("plain ascii answer", ()),
    ("héllo wörld — ✓ 🙂 done", ("wör",)),
    ("a🙂b🙂c stop here", ("🙂c", "here")),
    ("no stop ✓ in this one", ("zzz", "✓ x")),
    ("ends inside stop pre", ("prefix",)),
])
def test_incremental_text_equals_the_full_redecode(tok, monkeypatch, text, stops):
    tokens = tok.encode(text)  # byte tokens: multi-byte characters split across steps
    steps = []
    row = G._RowText(tok.decode)
    for t in tokens:
        if row.add(t, stops):
            steps.append(row.text)
            break
        steps.append(row.text)
    want_text, want_steps = old_generate_texts(tokens, tok.decode, stops)
    assert steps == want_steps and row.text == want_text
    monkeypatch.setattr(G, "generate_steps", lambda *a, **k: iter(torch.tensor([t]) for t in tokens))
    pieces = []
    out = generate(None, [[1]], None, GenerationConfig(max_new_tokens=len(tokens), stop_strings=stops), set(),
                   tok.decode, 0, pieces.append)
    assert out.texts == [want_text] and "".join(pieces) == want_text


def test_each_step_decodes_only_the_newest_tokens(tok, monkeypatch):
    tokens = tok.encode("word " * 60)
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return tok.decode(ids)

    monkeypatch.setattr(G, "generate_steps", lambda *a, **k: iter(torch.tensor([t]) for t in tokens))
    out = generate(None, [[1]], None, GenerationConfig(max_new_tokens=len(tokens)), set(), decode, 0)
    assert out.texts == ["word " * 60]
    assert max(calls[:-1]) == 1 and calls[-1] == len(tokens)  # per step one token; one full decode at the end


def test_lora_adapters_run_in_fp32_under_bf16_autocast_too():
    from vitune.model.lora import LoRALinear
    base = torch.nn.Linear(64, 48, bias=False)
    lora = LoRALinear(base, LoRAConfig(rank=4))
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.05)
    q = QuantLoRALinear.from_lora(lora, QuantConfig(8), "layer")
    x = torch.randn(3, 64)
    with torch.no_grad():
        plain = q(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = q(x)
    assert auto.dtype == plain.dtype and torch.equal(auto, plain)

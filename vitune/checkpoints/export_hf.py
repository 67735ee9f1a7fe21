"""Export to transformers: a vitune model folder -> a folder that `LlavaForConditionalGeneration`
and `AutoProcessor` (a `LlavaProcessor`) load, giving the same greedy answers.

    export_hf(model_dir, out_dir)     vitune export --format hf MODEL_DIR OUT_DIR

What maps (and `check_exportable` refuses everything else, saying why):
- tower: vitune's `vit` kind. With a class token (and CLIP's pre-norm) it is written as a CLIP
  vision tower, `vision_feature_select_strategy="default"` (drop the class token); without one (and
  without pre-norm) as a SigLIP tower without its pooling head, strategy "full".
  `vision_feature_layer` = `vision.feature_layer`: both index the tower's hidden states.
- connector: the MLP projector with no token reduction (LLaVA has no pooling) and hidden width =
  the LM's: `multi_modal_projector.linear_1 -> gelu -> linear_2`.
- LM: Llama (no biases) or Qwen2 (q/k/v biases). LoRA adapters are merged first. An `<image>` id
  past the LM's table gets a zero row (its embedding is always replaced by image features) and is
  suppressed in `generation_config.json`, as vitune never generates it.
- processor: `LlavaImageProcessorPil` (CLIP-style; unlike `CLIPImageProcessor` it can pad to a
  square with the mean colour, which vitune's `resize="pad"` does; the PIL backend, because
  torchvision's bicubic differs from PIL's), bicubic resize to the tower's size, vitune's
  mean/std; the tokenizer; a chat template rendering exactly as vitune's.
Needs `transformers` (imported here only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vitune.checkpoints.hf_import import _vit_key
from vitune.checkpoints.model_folder import load_pretrained
from vitune.config import ModelConfig
from vitune.data.tokenizer import IMAGE_TOKEN, Tokenizer
from vitune.files import atomic_dir, check_output_dir
from vitune.model.fuse import refuse_fused
from vitune.model.lora import merge_lora
from vitune.model.vlm import VLM


class ExportError(ValueError):
    """The model has a part that the target format cannot represent."""


HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def check_exportable(cfg: ModelConfig) -> None:
    """Raise `ExportError` naming every part that transformers' LLaVA cannot represent."""
    v, c = cfg.vision, cfg.connector
    problems = []
    if v.kind != "vit":
        problems.append(f"vision.kind={v.kind!r}: LLaVA in transformers takes a CLIP/SigLIP-layout ViT tower, "
                        "not a CNN (only vitune's 'vit' kind maps onto one)")
    elif v.class_token != v.pre_norm:
        problems.append(f"vision: class_token={v.class_token} with pre_norm={v.pre_norm} is neither CLIP's layout "
                        "(class token + pre-norm) nor SigLIP's (neither)")
    if c.kind != "mlp":
        problems.append(f"connector.kind={c.kind!r}: LLaVA's projector is the 2-layer MLP")
    if c.reduce != "none":
        problems.append(f"connector.reduce={c.reduce!r}: LLaVA has no token pooling or pixel shuffle; "
                        "export needs reduce='none'")
    if c.slot_embedding:
        problems.append("connector.slot_embedding=True: LLaVA's projector has no per-slot position embedding")
    if c.coords:
        problems.append("connector.coords=True: LLaVA's projector reads no (x, y) channels")
    if cfg.fusion.kind != "projector":
        problems.append(f"fusion.kind={cfg.fusion.kind}: LLaVA has image tokens in the sequence that depend on "
                        "neither the instruction nor cross-attention layers (only the projector exports)")
    if cfg.contrastive.dim:
        problems.append("contrastive.dim > 0: LLaVA has no alignment head (it would be dropped)")
    if c.hidden_dim not in (0, cfg.lm.dim):
        problems.append(f"connector.hidden_dim={c.hidden_dim}: LLaVA's projector hidden width is the LM's ({cfg.lm.dim})")
    if problems:
        raise ExportError("cannot export to transformers' LLaVA:\n  - " + "\n  - ".join(problems))


def _vision_config(cfg: ModelConfig):
    import transformers

    v = cfg.vision
    common = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=HF_ACTS[v.act], layer_norm_eps=v.norm_eps, num_channels=3)
    if v.class_token:
        return transformers.CLIPVisionConfig(**common)
    return transformers.SiglipVisionConfig(**common, vision_use_head=False)


def _text_config(cfg: ModelConfig, vocab: int, eos: list[int]):
    import transformers

    lm = cfg.lm
    common = dict(vocab_size=vocab, hidden_size=lm.dim, intermediate_size=lm.ffn_dim, num_hidden_layers=lm.layers,
                  num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
                  head_dim=lm.head_dim or lm.dim // lm.heads, rms_norm_eps=lm.norm_eps,
                  max_position_embeddings=lm.max_seq_len, tie_word_embeddings=lm.tie_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta}, hidden_act="silu",
                  bos_token_id=None, eos_token_id=eos, pad_token_id=eos[0])
    if lm.qkv_bias:  # Qwen2: q/k/v biases, no o_proj bias
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    return transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def _hf_state(model: VLM, vocab: int) -> dict[str, torch.Tensor]:
    """vitune tensors under LLaVA's (in-memory) names; the LM table padded to `vocab` rows."""
    out = {}
    for k, t in model.state_dict().items():
        part, rest = k.split(".", 1)
        if part == "vision":
            out[f"model.vision_tower.{_vit_key(rest)}"] = t
        elif part == "connector":
            out[f"model.multi_modal_projector.{rest}"] = t
        elif rest == "lm_head.weight":
            out["lm_head.weight"] = t
        else:
            out[f"model.language_model.{rest}"] = t
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in out and out[key].shape[0] < vocab:
            w = out[key]
            out[key] = torch.cat([w, w.new_zeros(vocab - w.shape[0], w.shape[1])])
    return out


def _chat_template(cfg: ModelConfig, tok: Tokenizer) -> str:
    """Jinja rendering messages (string or typed `image`/`text` parts) exactly as vitune's templates."""
    body = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}" + IMAGE_TOKEN + "\n{% elif c['type'] == 'text' %}{{ c['text'] }}"
            "{% endif %}{% endfor %}{% endif %}")
    if cfg.chat_template == "plain":
        eos = tok.token(tok.special.eos)
        return ("{% for m in messages %}{% if m['role'] != 'system' %}" + body +
                "{% if m['role'] == 'assistant' %}" + eos + "{% endif %}{% endif %}{% endfor %}")
    system = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + _jinja_text(cfg.system_prompt) +
              "<|im_end|>\n{% endif %}") if cfg.system_prompt else ""
    return (system + "{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + body + "<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _jinja_text(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}"


def _processor(cfg: ModelConfig, tok: Tokenizer, stop_ids: list[int]):
    from transformers import (
        LlavaImageProcessorPil,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    v = cfg.vision
    size = {"height": v.image_size, "width": v.image_size}
    images = LlavaImageProcessorPil(do_resize=True, size=size, resample=3, do_center_crop=False, crop_size=size,
                                 do_pad=v.resize == "pad", do_rescale=True, rescale_factor=1 / 255,
                                 do_normalize=True, image_mean=list(v.image_mean), image_std=list(v.image_std),
                                 do_convert_rgb=True)
    text = PreTrainedTokenizerFast(tokenizer_object=tok.tk, eos_token=tok.token(stop_ids[0]),
                                   pad_token=tok.token(tok.special.eos), extra_special_tokens={"image_token": IMAGE_TOKEN})
    return LlavaProcessor(image_processor=images, tokenizer=text, patch_size=v.patch_size,
                          vision_feature_select_strategy="default" if v.class_token else "full",
                          chat_template=_chat_template(cfg, tok), image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=int(v.class_token))


def to_hf(model: VLM, tok: Tokenizer):
    """(LlavaForConditionalGeneration, LlavaProcessor) equal to `model` (merged in place if it has LoRA)."""
    import transformers

    from vitune.data.chat import stop_token_id

    check_exportable(model.cfg)
    refuse_fused(model, "exporting to transformers")
    merge_lora(model)
    cfg, v = model.cfg, model.cfg.vision
    vocab = max(cfg.lm.vocab_size, model.image_token_id + 1)
    stops = list(dict.fromkeys([stop_token_id(tok, cfg.chat_template), tok.special.eos]))
    config = transformers.LlavaConfig(
        vision_config=_vision_config(cfg), text_config=_text_config(cfg, vocab, stops),
        image_token_index=model.image_token_id, image_seq_length=model.n_image_tokens, projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if v.class_token else "full",
        vision_feature_layer=v.feature_layer, multimodal_projector_bias=True, tie_word_embeddings=cfg.lm.tie_embeddings)
    hf = transformers.LlavaForConditionalGeneration(config).float().eval()
    _load(hf, _hf_state(model.float(), vocab))
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = stops, tok.special.eos
    hf.generation_config.bos_token_id = None
    if model.image_token_id >= cfg.lm.vocab_size:  # a padded row: vitune cannot generate it
        hf.generation_config.suppress_tokens = [model.image_token_id]
    return hf, _processor(cfg, tok, stops)


def _load(hf, state: dict[str, torch.Tensor]) -> None:
    """Strict but for the tower's final LayerNorm, which LLaVA never uses (set to identity)."""
    own = hf.state_dict()
    unused = {k for k in own if ".post_layernorm." in k}
    for k in unused:
        state[k] = torch.ones_like(own[k]) if k.endswith("weight") else torch.zeros_like(own[k])
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        own = {k: t for k, t in own.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ExportError(f"internal key map mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.load_state_dict(state, strict=False)


def export_hf(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    check_output_dir(out_dir, overwrite, {"model folder": model_dir})
    model, tok = load_pretrained(model_dir)
    check_exportable(model.cfg)  # before the slow transformers import
    hf, processor = to_hf(model, tok)
    with atomic_dir(Path(out_dir)) as tmp:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)

"""Data inspection: render one record of a LLaVA file exactly as training sees it, with the
trained tokens highlighted and the masked ones dim, so masking bugs are visible at a glance.
"""

from __future__ import annotations

from vitune.data.chat import IGNORE_INDEX, format_masked
from vitune.data.dataset import BadRecords, conversation_texts, load_conversations
from vitune.data.processor import encode_conversation
from vitune.data.tokenizer import Tokenizer
from vitune.files import DataError


def _tokenizer_and_image_tokens(model: str | None, preset_name: str, convs) -> tuple[Tokenizer, int, int, str]:
    if model:
        from vitune.checkpoints.model_folder import load_pretrained
        vlm, tok = load_pretrained(model)
        return tok, vlm.n_image_tokens, vlm.cfg.lm.max_seq_len, vlm.cfg.system_prompt
    from vitune.model.vlm import VLM
    from vitune.presets import preset
    from vitune.training.train import build_tokenizer
    cfg = preset(preset_name)
    tok = build_tokenizer(cfg, conversation_texts(convs))
    n_img = VLM(cfg.model, tok.special.image).n_image_tokens
    return tok, n_img, cfg.model.lm.max_seq_len, cfg.model.system_prompt


def inspect_record(path: str, index: int, template: str, model: str | None, preset_name: str,
                   image_root: str | None, color: bool = True) -> str:
    convs = load_conversations(path, image_root, BadRecords("error", print))
    if not convs:
        raise DataError(f"{path}: holds no records")
    if not 0 <= index < len(convs):
        raise DataError(f"{path}: --index {index} is out of range (0..{len(convs) - 1})")
    tok, n_img, max_len, system = _tokenizer_and_image_tokens(model, preset_name, convs)
    conv = convs[index]
    ids, labels = encode_conversation(tok, list(conv.messages), template, n_img, max_len,
                                      f"record {conv.id!r}", system)
    n_trained = sum(lab != IGNORE_INDEX for lab in labels[1:])
    legend = "trained tokens in bold green, masked dim" if color else "trained tokens in [[...]]"
    head = (f"record {conv.id!r} ({index} of {len(convs)}), template {template!r}: {len(ids)} tokens, "
            f"{n_trained} trained, {len(conv.images)} image(s) x {n_img} tokens; {legend}")
    return head + "\n" + "-" * 60 + "\n" + format_masked(tok, ids, labels, color) + "\n" + "-" * 60

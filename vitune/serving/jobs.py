"""A checked chat request and its decoded images -> the engine's `Job`: vitune messages with image
slots where the images were, the prompt rendered with the model's chat template, the reply's
token budget fitted to the context, the pixels and (instruction-conditioned fusions) each
image's instruction. What does not fit is a 400 `context_length_exceeded`.

A message's parts are joined by newlines, an image part becoming an image slot: `[image, text]`
is what `vitune chat` sends for an image and a question (`inference.assistant.user_turn`).
"""

from __future__ import annotations

import secrets

import torch
from PIL import Image

from vitune.conventions import IMAGE_SLOT
from vitune.data.chat import Message
from vitune.inference.assistant import Assistant, Request
from vitune.inference.generate import GenerationConfig
from vitune.serving.engine import Job
from vitune.serving.errors import bad_request
from vitune.serving.schema import ChatRequest, ImagePart


def to_messages(req: ChatRequest) -> list[Message]:
    return [Message(m.role, "\n".join(IMAGE_SLOT if isinstance(p, ImagePart) else p.text for p in m.parts))
            for m in req.messages]


def reply_budget(req: ChatRequest, prompt_len: int, max_seq_len: int, default: int) -> int:
    """max_tokens, or the default cut to what the context leaves; a 400 when it does not fit."""
    if req.max_tokens is not None and req.max_tokens >= max_seq_len:
        raise bad_request("max_tokens", f"{req.max_tokens} is over what this model can generate: its context "
                                        f"(max_seq_len) is {max_seq_len} tokens, prompt included",
                          "context_length_exceeded")
    room = max_seq_len - prompt_len
    budget = req.max_tokens if req.max_tokens is not None else min(default, room)
    if room < 1 or budget > room:
        raise bad_request("messages", f"the prompt is {prompt_len} tokens (images included) and the reply may take "
                                      f"{budget}: together over the model's context of {max_seq_len} tokens; "
                                      "shorten the messages or lower max_tokens", "context_length_exceeded")
    return budget


def build_job(assistant: Assistant, req: ChatRequest, images: list[Image.Image], default_max_tokens: int) -> Job:
    request = Request(images, to_messages(req))
    limit = assistant.model.cfg.lm.max_seq_len
    try:
        prompt = assistant.prompt_ids(request, 0)
    except ValueError as e:
        raise bad_request("messages", str(e), "context_length_exceeded") from None
    budget = reply_budget(req, len(prompt), limit, default_max_tokens)
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    gen = GenerationConfig(max_new_tokens=budget, temperature=req.temperature, top_p=req.top_p,
                           stop_strings=req.stop, seed=seed)
    pixels = assistant.transform(images) if images else None
    instructions = assistant.instructions([request], torch.device("cpu")) \
        if assistant.model.needs_instruction and images else None
    return Job(prompt, pixels, gen, instructions)

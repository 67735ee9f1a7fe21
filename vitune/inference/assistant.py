"""Inference: a loaded model answering questions about images, one at a time (streaming) or in
batches. Shared by `vitune chat`, `vitune predict` and `vitune eval --model`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from vitune.checkpoints.quantized import load_model
from vitune.data.chat import Message, render, stop_token_id
from vitune.data.packing import common_prefix_len
from vitune.data.processor import ImageTransform, encode_instructions, pad_instructions
from vitune.data.tokenizer import IMAGE_SLOT, Tokenizer
from vitune.inference.generate import GenerationConfig, generate
from vitune.model.fuse import fuse_for_inference
from vitune.model.quant import QuantConfig
from vitune.model.vlm import VLM


@dataclass
class Request:
    images: list[Image.Image]
    messages: list[Message]


def user_turn(question: str, n_images: int) -> Message:
    """A first user turn: the images' slots in front, then the question, which is text (a literal
    `<image>` in it is the word, not an image)."""
    return Message("user", "\n".join([IMAGE_SLOT] * n_images + [plain_text(question)]))


def plain_text(text: str) -> str:
    """User text, refused if it holds the image-slot character (only structure may place it)."""
    if IMAGE_SLOT in text:
        raise ValueError("the text holds the character U+FFFC, which vitune reserves for image slots")
    return text


PRECISIONS = ("fp32", "bf16")


def shared_prefix_len(prompts: list[list[int]], reqs: list[Request], image_id: int) -> int:
    """Tokens all prompts can share: 0 unless there are several, about the very same images, and
    their common start holds every image token and leaves each prompt at least one token of its own."""
    first = reqs[0].images
    if len(prompts) < 2 or any(len(r.images) != len(first) or any(a is not b for a, b in zip(r.images, first))
                               for r in reqs[1:]):
        return 0
    p = min(common_prefix_len(prompts), min(len(x) for x in prompts) - 1)
    return p if p > 0 and image_id not in prompts[0][p:] else 0


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


class Assistant:
    """`precision="bf16"`: matmuls under bf16 autocast (weights and attention stay fp32), as in
    bf16 training; about 1.5x faster on CPUs with bf16 units, answers may differ in rare ties."""

    def __init__(self, model: VLM, tok: Tokenizer, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.model, self.tok, self.precision = model, tok, precision
        self.template = model.cfg.chat_template
        self.transform = ImageTransform.for_vision(model.cfg.vision)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             precision: str = "fp32", quantize: QuantConfig | None = None, fuse: bool = True) -> "Assistant":
        """Any model folder (a quantised one as stored); `quantize`: weight-only int8 / int4 on load;
        `fuse`: the LM in its inference form (model/fuse.py: float adapters merged, q/k/v and gate/up
        as one matmul each), the same answers with fewer, larger matmuls."""
        model, tok = load_model(path, device, dtype, quantize)
        if fuse:
            fuse_for_inference(model.lm)
        return cls(model, tok, precision=precision)

    def prompt_ids(self, req: Request, max_new_tokens: int) -> list[int]:
        r = render(self.tok, req.messages, self.template, self.model.n_image_tokens,
                   add_generation_prompt=True, system_prompt=self.model.cfg.system_prompt)
        n_tags = sum(m.text.count(IMAGE_SLOT) for m in req.messages)
        if n_tags != len(req.images):
            raise ValueError(f"{n_tags} image slot(s) in the messages but {len(req.images)} image(s)")
        limit = self.model.cfg.lm.max_seq_len - max_new_tokens
        if len(r.input_ids) > limit:
            raise ValueError(f"prompt of {len(r.input_ids)} tokens + {max_new_tokens} new tokens exceeds "
                             f"max_seq_len={self.model.cfg.lm.max_seq_len}")
        return r.input_ids

    def answer_batch(self, reqs: list[Request], gen: GenerationConfig,
                     on_text: Callable[[str], None] | None = None) -> list[str]:
        """Answers in request order. Requests about the same images (the same objects) whose prompts
        share their start run that start once (`generate`'s `shared_prefix`)."""
        prompts = [self.prompt_ids(r, gen.max_new_tokens) for r in reqs]
        conditioned = self.model.needs_instruction
        can_share = gen.use_cache and self.model.shares_image_prefix
        shared = shared_prefix_len(prompts, reqs, self.tok.special.image) if can_share else 0
        images = reqs[0].images if shared else [im for r in reqs for im in r.images]
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        pixels = self.transform(images).to(device=device, dtype=dtype) if images else None
        stops = {stop_token_id(self.tok, self.template), self.tok.special.eos}
        instr = self.instructions(reqs, device) if conditioned else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = generate(self.model, prompts, pixels, gen, stops, self.tok.decode, self.tok.special.eos, on_text,
                           shared_prefix=shared, instructions=instr)
        return [t.strip() for t in out.texts]

    def instructions(self, reqs: list[Request], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's instruction (the user message holding it), as the fusion reads them."""
        max_len = self.model.cfg.fusion.text.max_len
        ids = [x for i, r in enumerate(reqs)
               for x in encode_instructions(self.tok, r.messages, max_len, f"request {i}", warn)]
        return tuple(t.to(device) for t in pad_instructions(ids, self.tok.special.eos))

    def answer(self, req: Request, gen: GenerationConfig, on_text: Callable[[str], None] | None = None) -> str:
        return self.answer_batch([req], gen, on_text)[0]

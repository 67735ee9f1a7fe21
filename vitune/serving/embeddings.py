"""Retrieval embeddings for `POST /v1/embeddings`, from the model's alignment head
(`model.contrastive.dim > 0`), encoded as `vitune eval --task retrieval` encodes them: a text is
`im_start` + its token ids cut to `model.contrastive.text.max_len`, padded with eos, through
`VLM.embed_texts`; an image (the documented extension: an `image_url` part as an input) goes
through the vision transform of training and `VLM.embed_images`. Unit vectors, fp32, in input order.
"""

from __future__ import annotations

import base64

import numpy as np
import torch
from PIL import Image

from vitune.data.processor import _encode_text, pad_instructions
from vitune.inference.assistant import Assistant


def has_retrieval_head(assistant: Assistant) -> bool:
    return assistant.model.contrastive is not None


@torch.inference_mode()
def embed(assistant: Assistant, items: list[str | Image.Image]) -> tuple[list[torch.Tensor], int]:
    """Each item's embedding `(d,)`, and the text tokens read (the usage count)."""
    model, tok = assistant.model, assistant.tok
    device = next(model.parameters()).device
    texts = [(i, x) for i, x in enumerate(items) if isinstance(x, str)]
    images = [(i, x) for i, x in enumerate(items) if not isinstance(x, str)]
    out: list[torch.Tensor | None] = [None] * len(items)
    n_tokens = 0
    if texts:
        max_len = model.cfg.contrastive.text.max_len
        ids = [_encode_text(tok, t, max_len, "input", "text encoder", lambda _: None) for _, t in texts]
        n_tokens = sum(len(x) for x in ids)
        z = model.embed_texts(*(t.to(device) for t in pad_instructions(ids, tok.special.eos))).float().cpu()
        for (i, _), row in zip(texts, z):
            out[i] = row
    if images:
        pixels = assistant.transform([im for _, im in images]).to(device, next(model.parameters()).dtype)
        v = model.embed_images(pixels).float().cpu()
        for (i, _), row in zip(images, v):
            out[i] = row
    return out, n_tokens


def encode_vector(v: torch.Tensor, fmt: str) -> list[float] | str:
    """OpenAI's encodings: a list of floats, or base64 of little-endian float32."""
    if fmt == "base64":
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in np.asarray(v, dtype=np.float32)]

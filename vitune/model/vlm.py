"""The VLM: vision encoder -> fusion -> connector -> language model, on one screen, plus the
optional alignment head (model/alignment.py) that embeds images and texts for retrieval.

An instruction-conditioned fusion (`model.fusion.kind` film / qformer, model/fusion.py) needs
each image's instruction as token ids: `instructions = (ids (n_img, L), mask (n_img, L))`.
Gated cross-attention (`xattn`, model/cross_attention.py) keeps the image out of the sequence:
one marker token per image, and blocks before the decoder layers that attend to its features.

    forward(batch)   -> (loss, n_targets)      training
    prepare()        -> (inputs_embeds, cross) text embeddings with image embeddings merged in, and
                                               for gated cross-attention the visual context
    contrastive_loss(), embed_images(), embed_texts()   alignment (InfoNCE) and retrieval
    inference/generate.py -> answers               decoding (greedy / sampling, KV cache, streaming)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vitune.config import ModelConfig
from vitune.model.alignment import ContrastiveHead
from vitune.model.attention import attention_layout
from vitune.model.connector import build_connector, merge_image_embeddings
from vitune.model.cross_attention import CrossContext, GatedCrossAttention
from vitune.model.fusion import Fusion
from vitune.model.lm import LM
from vitune.model.lora import apply_lora, is_lora_key
from vitune.model.losses import info_nce, lm_loss
from vitune.model.vision import build_vision

Instructions = tuple[torch.Tensor, torch.Tensor]  # (ids (n_img, L), mask (n_img, L) bool)


class VLM(nn.Module):
    def __init__(self, cfg: ModelConfig, image_token_id: int):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        self.vision = build_vision(cfg.vision)
        self.fusion = Fusion(cfg.fusion, self.vision, cfg.vision.width) if cfg.fusion.needs_instruction else None
        self.xattn = GatedCrossAttention(cfg.fusion, cfg.vision.width, cfg.lm.dim, cfg.lm.layers) \
            if cfg.fusion.kind == "xattn" else None
        n_tokens, dim = self.vision.num_tokens, cfg.vision.width
        if self.fusion is not None:
            n_tokens, dim = self.fusion.num_tokens(n_tokens), self.fusion.out_dim(dim)
        if self.xattn is not None:
            n_tokens = self.xattn.num_memory_tokens(n_tokens)
        self.connector = build_connector(cfg.connector, dim, cfg.lm.dim, n_tokens)
        self._fused_tokens = n_tokens
        self.lm = LM(cfg.lm)
        apply_lora(self.lm, cfg.lora)  # no-op at rank 0
        self.contrastive = ContrastiveHead(cfg.contrastive, cfg.vision.width) if cfg.contrastive.dim else None

    @property
    def n_image_tokens(self) -> int:
        """LM positions one image occupies (gated cross-attention: one marker)."""
        return 1 if self.xattn is not None else self.connector.num_tokens(self._fused_tokens)

    @property
    def shares_image_prefix(self) -> bool:
        """Whether questions about one image can share one prefix of its tokens (projector only)."""
        return self.fusion is None and self.xattn is None

    @property
    def needs_instruction(self) -> bool:
        """Whether image tokens depend on the instruction (then they cannot be shared across questions)."""
        return self.fusion is not None

    def _tower_grad(self) -> bool:
        return any(p.requires_grad for p in self.vision.parameters())

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower alone, unconditioned: `(n_img, 3, H, W) -> (n_img, N_v, D_v)`; a frozen tower
        runs without autograd."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._tower_grad()):
            return self.vision(pixel_values)

    def encode_images(self, pixel_values: torch.Tensor, instructions: Instructions | None = None) -> torch.Tensor:
        """`(n_img, 3, H, W) -> (n_img, N, D_lm)`: the image tokens the LM reads (gated
        cross-attention: the memory its blocks attend to)."""
        if self.xattn is not None:
            features = self.image_features(pixel_values)
            if self.xattn.resampler is not None:
                features = self.xattn.resampler(features)
            return self.connector(features)
        if self.fusion is None:
            return self.connector(self.image_features(pixel_values))
        if instructions is None or instructions[0].shape[0] != pixel_values.shape[0]:
            raise ValueError(f"model.fusion.kind={self.cfg.fusion.kind} needs one instruction per image")
        return self.connector(self.fusion.encode(self.vision, pixel_values, *instructions,
                                                 tower_grad=self._tower_grad()))

    def _head(self) -> ContrastiveHead:
        if self.contrastive is None:
            raise ValueError("this model has no alignment head (model.contrastive.dim is 0)")
        return self.contrastive

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Retrieval embeddings `(n_img, d)`, unit length."""
        return self._head().embed_image(self.image_features(pixel_values))

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Retrieval embeddings of texts `(n, d)`, unit length."""
        return self._head().embed_text(ids, mask)

    def contrastive_loss(self, pixel_values: torch.Tensor, texts: Instructions, groups: torch.Tensor | None,
                         gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Symmetric InfoNCE of image i against text i, the batch's other pairs the negatives.
        `gather(x)`: x's rows from every process of a distributed run, concatenated (those pairs are
        negatives too, as in the one-process batch)."""
        image, text = self.embed_images(pixel_values), self.embed_texts(*texts)
        if gather is not None:
            image, text = gather(image), gather(text)
            groups = None if groups is None else gather(groups)
        return info_nce(image, text, self._head().scale(), groups)

    def prepare(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                instructions: Instructions | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, CrossContext | None]:
        """Text embeddings with the images merged in `(B, T, D_lm)`, and for gated cross-attention
        the visual context the LM's blocks attend to (None otherwise). `positions (B, T)`: where
        each token is (default 0..T-1); a token sees the images whose marker is not after it."""
        text = self.lm.embed(input_ids)  # (B, T, D_lm)
        image_mask = input_ids == self.image_token_id
        if pixel_values is None or pixel_values.shape[0] == 0:
            images = text.new_zeros(0, self.connector.num_tokens(self._fused_tokens), text.shape[-1])
        else:
            images = self.encode_images(pixel_values, instructions)
        if self.xattn is None:
            return merge_image_embeddings(text, images, image_mask), None
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        markers = self.xattn.marker.to(text.dtype).expand(images.shape[0], 1, -1)
        embeds = merge_image_embeddings(text, markers, image_mask)
        return embeds, self.xattn.context(images, input_ids, self.image_token_id, positions)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     instructions: Instructions | None = None) -> torch.Tensor:
        """`prepare` for models whose images live in the sequence."""
        if self.xattn is not None:
            raise ValueError("model.fusion.kind=xattn: the image is not in the sequence; use prepare()")
        return self.prepare(input_ids, pixel_values, instructions)[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None,
        n_targets: int | None = None,
        segments: torch.Tensor | None = None,
        instructions: Instructions | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Right-padded `input_ids/labels (B, T)`; loss normalised by `n_targets` (default: this batch's).
        `segments (B, T)`: rows packed behind a shared prefix (vitune.data.packing); None: plain causal."""
        B, T = input_ids.shape
        if segments is None:
            positions, mask = torch.arange(T, device=input_ids.device).expand(B, T), None
        else:
            positions, mask = attention_layout(segments)
        embeds, cross = self.prepare(input_ids, pixel_values, instructions, positions)
        hidden = self.lm(embeds, positions, mask, before_layer=cross)  # (B, T, D_lm)
        return lm_loss(hidden, labels, self.lm.head_weight(), n_targets)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part name, as stages name them (`vision`, `fusion`, `connector`, `lm`, `lora`,
        `contrastive`)."""
        lm = list(self.lm.named_parameters())
        return {
            "vision": list(self.vision.parameters()),
            "fusion": [p for m in (self.fusion, self.xattn) if m is not None for p in m.parameters()],
            "connector": list(self.connector.parameters()),
            "lm": [p for n, p in lm if not is_lora_key(n)],
            "lora": [p for n, p in lm if is_lora_key(n)],
            "contrastive": [] if self.contrastive is None else list(self.contrastive.parameters()),
        }

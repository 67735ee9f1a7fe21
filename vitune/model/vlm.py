"""The VLM: vision encoder -> fusion -> connector -> language model, on one screen.

An instruction-conditioned fusion (`model.fusion.kind` film / qformer, model/fusion.py) needs
each image's instruction as token ids: `instructions = (ids (n_img, L), mask (n_img, L))`.

    forward(batch)   -> (loss, n_targets)      training
    embed_inputs()   -> inputs_embeds          text embeddings with image embeddings merged in
    inference/generate.py -> answers               decoding (greedy / sampling, KV cache, streaming)
"""

from __future__ import annotations

import torch
from torch import nn

from vitune.config import ModelConfig
from vitune.model.attention import attention_layout
from vitune.model.connector import build_connector, merge_image_embeddings
from vitune.model.fusion import Fusion
from vitune.model.lm import LM
from vitune.model.lora import apply_lora, is_lora_key
from vitune.model.losses import lm_loss
from vitune.model.vision import build_vision

Instructions = tuple[torch.Tensor, torch.Tensor]  # (ids (n_img, L), mask (n_img, L) bool)


class VLM(nn.Module):
    def __init__(self, cfg: ModelConfig, image_token_id: int):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        self.vision = build_vision(cfg.vision)
        self.fusion = Fusion(cfg.fusion, self.vision, cfg.vision.width) if cfg.fusion.needs_instruction else None
        n_tokens, dim = self.vision.num_tokens, cfg.vision.width
        if self.fusion is not None:
            n_tokens, dim = self.fusion.num_tokens(n_tokens), self.fusion.out_dim(dim)
        self.connector = build_connector(cfg.connector, dim, cfg.lm.dim, n_tokens)
        self._fused_tokens = n_tokens
        self.lm = LM(cfg.lm)
        apply_lora(self.lm, cfg.lora)  # no-op at rank 0

    @property
    def n_image_tokens(self) -> int:
        """LM positions one image occupies."""
        return self.connector.num_tokens(self._fused_tokens)

    @property
    def needs_instruction(self) -> bool:
        """Whether image tokens depend on the instruction (then they cannot be shared across questions)."""
        return self.fusion is not None

    def encode_images(self, pixel_values: torch.Tensor, instructions: Instructions | None = None) -> torch.Tensor:
        """`(n_img, 3, H, W) -> (n_img, N, D_lm)`; a frozen tower runs without autograd."""
        tower_grad = any(p.requires_grad for p in self.vision.parameters())
        if self.fusion is not None:
            if instructions is None or instructions[0].shape[0] != pixel_values.shape[0]:
                raise ValueError(f"model.fusion.kind={self.cfg.fusion.kind} needs one instruction per image")
            features = self.fusion.encode(self.vision, pixel_values, *instructions, tower_grad=tower_grad)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and tower_grad):
                features = self.vision(pixel_values)  # (n_img, N_v, D_v)
        return self.connector(features)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     instructions: Instructions | None = None) -> torch.Tensor:
        text = self.lm.embed(input_ids)  # (B, T, D_lm)
        image_mask = input_ids == self.image_token_id
        if pixel_values is None or pixel_values.shape[0] == 0:
            images = text.new_zeros(0, self.n_image_tokens, text.shape[-1])
        else:
            images = self.encode_images(pixel_values, instructions)
        return merge_image_embeddings(text, images, image_mask)

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
        embeds = self.embed_inputs(input_ids, pixel_values, instructions)
        B, T = input_ids.shape
        if segments is None:
            positions, mask = torch.arange(T, device=input_ids.device).expand(B, T), None
        else:
            positions, mask = attention_layout(segments)
        hidden = self.lm(embeds, positions, mask)  # (B, T, D_lm)
        return lm_loss(hidden, labels, self.lm.head_weight(), n_targets)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part name, as stages name them (`vision`, `fusion`, `connector`, `lm`, `lora`)."""
        lm = list(self.lm.named_parameters())
        return {
            "vision": list(self.vision.parameters()),
            "fusion": [] if self.fusion is None else list(self.fusion.parameters()),
            "connector": list(self.connector.parameters()),
            "lm": [p for n, p in lm if not is_lora_key(n)],
            "lora": [p for n, p in lm if is_lora_key(n)],
        }

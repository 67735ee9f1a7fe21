"""Image-text retrieval: Recall@K in both directions from image and text embeddings.

Similarity is cosine (rows normalised here). The multi-caption protocol (COCO / Flickr30k style):
each text belongs to one image (`text_to_image`), an image may have several texts.
- text -> image: a hit at K when the text's own image is among its K most similar images;
- image -> text: a hit at K when ANY of the image's texts is among its K most similar texts.
  Images without a text are not scored in this direction (`n_i2t` counts those that are).
Ties are pessimistic: a correct item ranks after every wrong item with the same similarity, so
identical embeddings never score by luck of ordering (all-equal similarities give Recall@1 = 0
unless there is a single candidate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalResult:
    i2t: dict[int, float]  # K -> fraction of images with one of their texts in their top K
    t2i: dict[int, float]  # K -> fraction of texts with their image in their top K
    n_i2t: int  # images scored (those with at least one text)
    n_t2i: int  # texts scored (all of them)
    n_images: int


def _unit_rows(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) array, got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if not np.all(norms > 0) or not np.all(np.isfinite(norms)):
        raise ValueError(f"{name}: every row needs a finite, non-zero norm")
    return a / norms


def _recall(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """ranks: 0-based rank of the (best) correct item per query."""
    return {k: float((ranks < k).mean()) for k in ks}


def recall_at_k(image_emb: np.ndarray | torch.Tensor, text_emb: np.ndarray | torch.Tensor,
                text_to_image: Sequence[int], ks: Sequence[int] = DEFAULT_KS) -> RetrievalResult:
    """Recall@K for each K in `ks`, image->text and text->image (rules in the module docstring).

    image_emb (N_i, D), text_emb (N_t, D); text_to_image[t] is the index of text t's image.
    """
    images, texts = _unit_rows(image_emb, "image_emb"), _unit_rows(text_emb, "text_emb")
    owner = np.asarray(text_to_image, dtype=np.int64)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"embedding sizes differ: images {images.shape[1]}, texts {texts.shape[1]}")
    if owner.shape != (len(texts),) or owner.min() < 0 or owner.max() >= len(images):
        raise ValueError(f"text_to_image must give each of the {len(texts)} texts an image index "
                         f"in [0, {len(images)})")
    if any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be integers >= 1, got {list(ks)}")
    sim = images @ texts.T  # (N_i, N_t)
    own = owner[None, :] == np.arange(len(images))[:, None]  # own[i, t]: text t is image i's
    # text -> image: images other than its own at least as similar as its own.
    t2i_sim = sim.T  # (N_t, N_i)
    correct = t2i_sim[np.arange(len(texts)), owner][:, None]
    t2i_ranks = ((t2i_sim >= correct) & ~own.T).sum(axis=1)
    # image -> text: wrong texts at least as similar as the image's best own text.
    has_text = own.any(axis=1)
    best = np.where(own, sim, -np.inf).max(axis=1, keepdims=True)
    i2t_ranks = ((sim >= best) & ~own).sum(axis=1)[has_text]
    return RetrievalResult(_recall(i2t_ranks, ks), _recall(t2i_ranks, ks), int(has_text.sum()), len(texts),
                           len(images))

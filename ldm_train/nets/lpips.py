"""LPIPS perceptual distance (Zhang et al. 2018) with a VGG16 backbone, as latent-diffusion uses it.

Written here rather than taken from the `lpips` package or torchmetrics' LPIPS because both fetch
the VGG16 backbone from the internet on first use, and this machine cannot: here it comes from a
local file, or stays random (tests only). The layout follows the lpips package's v0.1 "vgg" net, so
its weight files load unchanged:
- vgg_weights: torchvision's ImageNet VGG16 (vgg16-397923af.pth; only the `features.*` keys are used),
- heads_weights: the LPIPS linear heads (v0.1 vgg.pth, keys lin0..lin4.model.1.weight); by default
  the copy that torchmetrics ships inside its package, so only the backbone has to be provided.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchmetrics.functional.image.lpips as torchmetrics_lpips
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from ldm_train.errors import UserError

# Index of the ReLU after which each of the five compared VGG16 feature maps is taken
# (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), and their widths.
TAPS = (3, 8, 15, 22, 29)
WIDTHS = (64, 128, 256, 512, 512)
# LPIPS's input normalisation of [-1, 1] images to ImageNet statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# The LPIPS v0.1 linear heads that torchmetrics installs with itself.
TORCHMETRICS_HEADS = Path(torchmetrics_lpips.__file__).parent / "lpips_models" / "vgg.pth"


class LPIPS(nn.Module):
    """Perceptual distance between two batches of images in [-1, 1]: B x 1 x 1 x 1.

    Frozen: no parameter trains and the module stays in eval mode even inside a training model.
    heads_weights=None takes torchmetrics' copy of the heads. pretrained=False keeps random
    weights, for tests of the code path; a loss needs real weights.
    """

    def __init__(
        self,
        vgg_weights: str | Path | None = None,
        heads_weights: str | Path | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        # VGG16's convolutional stack (torchvision's layer table) without the 100M-parameter
        # classifier that vgg16() would build and LPIPS never uses.
        self.features = make_layers(cfgs["D"])[: TAPS[-1] + 1]
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Dropout(), nn.Conv2d(width, 1, 1, bias=False)) for width in WIDTHS
        )
        for head in self.heads:  # LPIPS's heads are non-negative (trained so): a distance is >= 0
            head[1].weight.data.abs_()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self.load_weights(vgg_weights, heads_weights)
        self.requires_grad_(False)
        self.eval()

    def load_weights(
        self, vgg_weights: str | Path | None, heads_weights: str | Path | None
    ) -> None:
        vgg = read_state_dict(
            vgg_weights, "vgg_weights", "torchvision's VGG16 (vgg16-397923af.pth)"
        )
        heads_weights = heads_weights or TORCHMETRICS_HEADS
        heads = read_state_dict(heads_weights, "heads_weights", "LPIPS v0.1 vgg.pth")
        features = {
            k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")
        }
        features = {k: v for k, v in features.items() if int(k.split(".")[0]) <= TAPS[-1]}
        heads = {
            f"{i}.1.weight": heads[f"lin{i}.model.1.weight"]
            for i in range(len(WIDTHS))
            if f"lin{i}.model.1.weight" in heads
        }
        try:
            self.features.load_state_dict(features)
            self.heads.load_state_dict(heads)
        except RuntimeError as error:
            first_line = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise UserError(
                f"LPIPS weights do not fit ({vgg_weights}, {heads_weights}): {first_line}"
            ) from None

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen metric net: never dropout, whatever its parent does

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = (images - self.shift) / self.scale
        y = (targets - self.shift) / self.scale
        distance = 0
        start = 0
        for tap, head in zip(TAPS, self.heads, strict=True):
            x = self.features[start : tap + 1](x)
            y = self.features[start : tap + 1](y)
            start = tap + 1
            squared = (unit_channels(x) - unit_channels(y)) ** 2
            distance = distance + head(squared).mean(dim=(2, 3), keepdim=True)
        return distance


def unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each pixel's feature vector scaled to unit length (LPIPS's normalize_tensor)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def read_state_dict(path: str | Path | None, option: str, what: str) -> dict[str, torch.Tensor]:
    if not path:
        raise UserError(
            f"LPIPS needs {what} on disk (it cannot be downloaded here): set "
            f"stage.module.loss.perceptual.{option}, or stage.module.loss.perceptual_weight=0"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"LPIPS {option}: no file at {path}; put {what} there "
            f"or point stage.module.loss.perceptual.{option} at it"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state

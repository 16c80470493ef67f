"""PatchGAN discriminator of pix2pix, as taming-transformers and latent-diffusion use it.

Written here because neither diffusers nor torchvision ships one. Layer for layer it is
NLayerDiscriminator (taming/modules/discriminator/model.py) with BatchNorm, so its sizes read the same.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_train.errors import UserError


class NLayerDiscriminator(nn.Module):
    """Maps B x C x H x W images to B x 1 x h x w logits, one per overlapping patch (real > 0).

    n_layers stride-2 convolutions (the first without norm), then a stride-1 convolution and the
    one-channel head; the width doubles per layer up to 8 x channels.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        if in_channels < 1 or channels < 1 or n_layers < 1:
            raise UserError(
                "NLayerDiscriminator needs in_channels, channels and n_layers >= 1, got "
                f"{in_channels}, {channels}, {n_layers}"
            )
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        width = channels
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            out = channels * min(2**n, 8)
            layers += [
                nn.Conv2d(width, out, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, True),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def init_weights(module: nn.Module) -> None:
    """pix2pix's initialisation: N(0, 0.02) convolutions, N(1, 0.02) norm scales."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)

"""The autoencoder's loss: latent-diffusion's LPIPSWithDiscriminator, term by term.

Generator (autoencoder) terms, summed into its loss:
  rec         L1 or L2 per pixel,
  perceptual  perceptual_weight * LPIPS (optional),
  kl          kl_weight * KL(posterior || N(0, 1)),
  gan         adaptive weight * disc_weight * -mean(D(reconstruction)) (optional, from disc_start).
Discriminator term (its own optimizer):
  disc        hinge loss on D(image) and D(reconstruction).

As in latent-diffusion, per-pixel terms are summed over an image's pixels and averaged over the
batch, and the KL is summed over the latent's elements: so kl_weight=1e-6 weighs what it weighs
there. latent-diffusion divides the reconstruction by exp(logvar) with a learnable logvar, but never
gives that parameter to an optimizer, so it stays 0 and is left out here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ldm_train.errors import UserError, check_choice

Reconstruction = Literal["l1", "l2"]
Terms = dict[str, torch.Tensor]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: 0 once real logits are >= 1 and fake ones <= -1."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    nll: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """||d nll / d last_layer|| / ||d gan / d last_layer||, detached (taming's balance of the
    GAN term against reconstruction at the decoder's output layer)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """Loss terms of a KL autoencoder; owns the frozen LPIPS net and the trained discriminator.

    perceptual and discriminator are factories (e.g. Hydra partials), called only when their
    weight is > 0, so a switched-off term builds nothing (LPIPS needs weight files on disk).
    """

    def __init__(
        self,
        reconstruction: Reconstruction = "l1",
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        perceptual: Callable[[], nn.Module] | None = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        discriminator: Callable[[], nn.Module] | None = None,
    ):
        super().__init__()
        check_choice("stage.module.loss.reconstruction", reconstruction, get_args(Reconstruction))
        for name, value in [
            ("kl_weight", kl_weight),
            ("perceptual_weight", perceptual_weight),
            ("disc_weight", disc_weight),
            ("disc_start", disc_start),
        ]:
            if value < 0:
                raise UserError(f"stage.module.loss.{name}={value} must be >= 0")
        for name, weight, factory in [
            ("perceptual", perceptual_weight, perceptual),
            ("discriminator", disc_weight, discriminator),
        ]:
            if weight > 0 and factory is None:
                raise UserError(
                    f"stage.module.loss.{name} is null but its weight is > 0: configure it or set "
                    "the weight to 0"
                )
        self.reconstruction = reconstruction
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.perceptual = (
            perceptual().requires_grad_(False).eval() if perceptual_weight > 0 else None
        )
        self.discriminator = discriminator() if disc_weight > 0 else None

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms are on at this training step (from disc_start on)."""
        return self.discriminator is not None and step >= self.disc_start

    def reconstruction_term(
        self, reconstruction: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """Per-pixel L1 or L2, summed over each image, averaged over the batch."""
        error = reconstruction - images
        per_pixel = error.abs() if self.reconstruction == "l1" else error.square()
        return per_pixel.sum() / images.shape[0]

    def generator_terms(
        self,
        images: torch.Tensor,
        reconstruction: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[Terms, Terms]:
        """(terms whose sum is the autoencoder's loss, diagnostics to log beside them).

        last_layer: the decoder's output weight, where the GAN term's adaptive weight is measured.
        """
        terms = {"rec": self.reconstruction_term(reconstruction, images)}
        if self.perceptual is not None:
            # LPIPS is one number per image; latent-diffusion adds it to every pixel's error.
            pixels = images[0].numel()
            distance = self.perceptual(images, reconstruction).mean()
            terms["perceptual"] = self.perceptual_weight * pixels * distance
        # diffusers' kl() sums over the latent's elements: one value per image.
        terms["kl"] = self.kl_weight * posterior.kl().mean()
        extras: Terms = {}
        if self.discriminator_active(step):
            if last_layer is None:
                raise ValueError("the GAN term needs the decoder's last layer for its weight")
            gan = -self.discriminator(reconstruction).mean()
            nll = terms["rec"] + terms.get("perceptual", 0.0)
            weight = adaptive_weight(nll, gan, last_layer) * self.disc_weight
            terms["gan"] = weight * gan
            extras["gan_weight"] = weight
        return terms, extras

    def discriminator_terms(
        self, images: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[Terms, Terms]:
        """(the discriminator's hinge loss as {"disc": ...}, its mean logits to log)."""
        if self.discriminator is None:
            raise ValueError("no discriminator: stage.module.loss.disc_weight is 0")
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstruction.detach())
        terms = {"disc": hinge_d_loss(logits_real, logits_fake)}
        extras = {"logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return terms, extras

"""ldm_train: train the three stages of a latent diffusion model (CLIP, VAE, U-Net)."""

__version__ = "0.1.0"

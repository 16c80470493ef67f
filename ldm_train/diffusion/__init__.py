"""Diffusion glue on top of diffusers: the noise schedule and its options (schedule.py), the frozen
upstream parts (frozen.py: VAE and text encoder; text_encoder.py: loading text towers), the
training loss (loss.py), sampling with classifier-free guidance (sampler.py) and the exported
generation pipeline (pipeline.py)."""

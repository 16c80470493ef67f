"""Diffusion glue on top of diffusers: the noise schedule and its options (schedule.py), the frozen
upstream parts (upstream.py: VAE and text encoder), the training loss (loss.py), sampling with
classifier-free guidance (sampler.py) and the zero-shot check of generated images (evaluate.py)."""

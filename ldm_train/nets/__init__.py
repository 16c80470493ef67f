"""Plain nn.Modules that no library provides: the PatchGAN discriminator and the LPIPS metric net."""

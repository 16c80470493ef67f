"""On-disk formats of the parts the stages export, one module each: it writes the format and reads
it, and everything else asks it (clip_model: open_clip folders; transformers_clip: a pipeline's
text_encoder/ + tokenizer/; vae_folder: a diffusers AutoencoderKL folder and the latent-factor
rule; lora_file: LoRA adapter files in diffusers' and kohya's layouts). The U-Net's generation
folder, which needs the sampler, is ldm_train/diffusion/pipeline.py."""

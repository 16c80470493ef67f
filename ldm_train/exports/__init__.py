"""On-disk formats of what the stages export, one module each: it writes the format and reads it,
and everything else asks it (clip: open_clip folders; transformers_clip: a pipeline's
text_encoder/ + tokenizer/; pipeline: the U-Net's generation folder)."""

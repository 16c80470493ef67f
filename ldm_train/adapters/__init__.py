"""Adapting an existing model to new images: LoRA for the U-Net stage (lora.py, config group
adapter=lora), DreamBooth's prior preservation (prior.py), and the commands around them: class
images drawn by the base model (class_images.py) and merging adapters into an export (merge.py)."""

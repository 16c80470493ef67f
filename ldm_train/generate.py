"""python -m ldm_train.generate EXPORT_DIR --prompt "a red circle" [--prompt ...] [--prompts-file F]
    [--n 4] [--seed 0] [--steps 50] [--guidance 4.0] [--sampler ddim|euler|dpmpp]
    [--width W --height H] [--lora PATH [--lora-scale S]]... --out DIR

Turns prompts into images with the folder `stage=unet` exports (outputs/<experiment>/unet/export, a
diffusers StableDiffusionPipeline folder, or one exported before that layout): one PNG per image in
DIR (<prompt#>-<image#>.png, listed with their prompts and seeds in images.json) and grid.png (a row
per prompt). Image j of every prompt starts from the noise of seed + j: the same seed gives the same
images. --lora applies a LoRA adapter (a LoRA run's export, or a file in diffusers' or kohya's
layout) at --lora-scale (default 1); repeat both for several.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ldm_train import quiet
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.sizes import save_rows
from ldm_train.errors import UserError
from ldm_train.formats.lora_file import lora_specs

log = logging.getLogger("ldm_train.generate")


def save_images(
    images: torch.Tensor, prompts: Sequence[str], n: int, seed: int, out_dir: str | Path
) -> list[Path]:
    """n images per prompt (prompt-major) as the PNGs, images.json and grid.png of save_rows."""
    return save_rows(list(images.view(len(prompts), n, *images.shape[1:])), prompts, seed, out_dir)


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    found = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {path} does not exist")
        found += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_train.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dir", help="the folder stage=unet exports (.../unet/export)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image j starts from seed + j")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--guidance", type=float, default=4.0, help="guidance scale; 1: none")
    parser.add_argument("--sampler", choices=["ddim", "euler", "dpmpp"], default="ddim")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--width", type=int, help="pixels (default: the export's image size)")
    parser.add_argument("--height", type=int, help="pixels (default: the export's image size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="samples", help="output folder (default ./samples)")
    parser.add_argument("--lora", action="append", help="a LoRA adapter: folder or .safetensors")
    parser.add_argument("--lora-scale", action="append", type=float, help="per --lora (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet.install()  # library notes a user cannot act on (ldm_train/quiet.py)
    try:
        if args.n < 1:
            raise UserError(f"--n {args.n}: need at least 1 image per prompt")
        pipeline = Pipeline.load(args.export_dir, args.device)
        pipeline.add_loras(lora_specs(args.lora, args.lora_scale))
        prompts = read_prompts(args.prompt, args.prompts_file)
        if not prompts:
            if pipeline.text_encoder is not None:
                raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
            prompts = [""]  # an unconditional model
        options = replace(
            pipeline.sampling,
            sampler=args.sampler,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        size = (args.width or pipeline.image_size, args.height or pipeline.image_size)
        images = pipeline.generate(prompts, args.n, options, size=size)
        paths = save_images(images, prompts, args.n, args.seed, args.out)
    except UserError as error:
        print(f"ldm_train.generate: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} images and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

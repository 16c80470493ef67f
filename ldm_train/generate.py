"""python -m ldm_train.generate EXPORT_DIR --prompt "a red circle" [--prompt ...] [--prompts-file F]
    [--n 4] [--seed 0] [--steps 50] [--guidance 4.0] [--sampler ddim|euler|heun|dpmpp]
    [--width W --height H] --out DIR

Turns prompts into images with the folder `stage=unet` exports (outputs/<experiment>/unet/export, a
diffusers StableDiffusionPipeline folder, or one exported before that layout): one PNG per image in
DIR (<prompt#>-<image#>.png, listed with their prompts and seeds in images.json) and grid.png (a row
per prompt). Image j of every prompt starts from the noise of seed + j: the same seed gives the same
images.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torchvision.utils import save_image

from ldm_train import quiet
from ldm_train.callbacks.images import image_grid
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.schedule import ALL_SAMPLERS
from ldm_train.errors import UserError

log = logging.getLogger("ldm_train.generate")


def save_images(
    images: torch.Tensor, prompts: Sequence[str], n: int, seed: int, out_dir: str | Path
) -> list[Path]:
    """One PNG per image, images.json (file, prompt, seed) and grid.png (a row per prompt)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = (images + 1) / 2
    paths, listing = [], []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            path = out_dir / f"{i:03d}-{j:03d}.png"
            save_image(pixels[i * n + j], path)
            paths.append(path)
            listing.append({"file": path.name, "prompt": prompt, "seed": seed + j})
    (out_dir / "images.json").write_text(json.dumps(listing, indent=2))
    rows = list(images.view(len(prompts), n, *images.shape[1:]))
    save_image(image_grid(rows, max_columns=n), out_dir / "grid.png")
    return paths


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
    parser.add_argument(
        "--sampler",
        choices=ALL_SAMPLERS,
        help="ddim | euler | dpmpp; a flow model: euler | heun | dpmpp (default: the export's)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--width", type=int, help="pixels (default: the export's image size)")
    parser.add_argument("--height", type=int, help="pixels (default: the export's image size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="samples", help="output folder (default ./samples)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet.install()  # library notes a user cannot act on (ldm_train/quiet.py)
    try:
        if args.n < 1:
            raise UserError(f"--n {args.n}: need at least 1 image per prompt")
        pipeline = Pipeline.load(args.export_dir, args.device)
        prompts = read_prompts(args.prompt, args.prompts_file)
        if not prompts:
            if pipeline.text_encoder is not None:
                raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
            prompts = [""]  # an unconditional model
        options = replace(
            pipeline.sampling,
            sampler=args.sampler or pipeline.sampling.sampler,
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

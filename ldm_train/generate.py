"""python -m ldm_train.generate EXPORT_DIR --prompt "a red circle" [--prompt ...] [--prompts-file F]
    [--n 4] [--sampler ddim|euler|heun|dpmpp] [--steps S] [--guidance G] [--seed N]
    [--batch-size B] [--width W --height H] [--lora PATH [--lora-scale S]]... [--device D]
    [--out DIR]

Turns prompts into images with the folder `stage=unet` exports (outputs/<experiment>/unet/export, a
diffusers StableDiffusionPipeline folder, or one exported before that layout): one PNG per image in
DIR (<prompt#>-<image#>.png, listed with their prompts and seeds in images.json) and grid.png (a row
per prompt). Image j of every prompt starts from the noise of seed + j: the same seed gives the same
images. A sampling option not given is the export's (the sampling it recorded, its image size).
--lora applies a LoRA adapter (a LoRA run's export, or a file in diffusers' or kohya's layout) at
--lora-scale (default 1); repeat both for several. DIR is written whole (a fresh folder beside
it, moved into place): an earlier output of generate there is replaced, a folder of other files
is refused.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm_train import cli, progress
from ldm_train.atomic import check_ours, write_folder
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.sizes import save_rows
from ldm_train.errors import UserError
from ldm_train.formats.lora_file import lora_specs
from ldm_train.rules import Parser, Real, typed

log = logging.getLogger("ldm_train.generate")
KNOWN = ("images.json",)  # what marked generate's output before the marker file


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
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise UserError(
                f"--prompts-file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8"
            ) from None
        found += [line.strip() for line in text.splitlines() if line.strip()]
    return found


def parse_args(argv: Sequence[str] | None):
    parser = Parser("python -m ldm_train.generate", __doc__)
    parser.add_argument("export_dir", help="the folder stage=unet exports (.../unet/export)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    cli.add_image_options(parser, sizes=True)
    cli.add_sampling_options(parser)
    parser.add_argument("--out", default="samples", help="output folder (default ./samples)")
    parser.add_argument("--lora", action="append", help="a LoRA adapter: folder or .safetensors")
    scale = typed(Real(-100, 100))
    parser.add_argument("--lora-scale", action="append", type=scale, help="per --lora (default 1)")
    return parser.parse_args(argv)


def generate(args) -> int:
    out = Path(args.out)
    check_ours(out, "--out", KNOWN)  # before the work, not after it
    pipeline = Pipeline.load(args.export_dir, cli.device(args.device))
    pipeline.add_loras(lora_specs(args.lora, args.lora_scale))
    prompts = read_prompts(args.prompt, args.prompts_file)
    if not prompts:
        if pipeline.text_encoder is not None:
            raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
        prompts = [""]  # an unconditional model
    options = cli.sampling_options(args, pipeline.sampling)
    size = [pipeline.image_size if side is None else side for side in (args.width, args.height)]
    with progress.shown():
        images = pipeline.generate(prompts, args.n, options, size=size)
    write_folder(
        out,
        lambda folder: save_images(images, prompts, args.n, options.seed, folder),
        "generated images",
        "--out",
        KNOWN,
    )
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run("ldm_train.generate", lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())

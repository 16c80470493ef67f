"""python -m ldm_train.adapters.class_images EXPORT --prompt "a photo of a dog" [--prompt ...]
    --n 50 --out DIR [--seed 0] [--steps 50] [--guidance G] [--shard-size 1000]

Class images for DreamBooth's prior preservation (ldm_train.adapters.prior): the base model draws
--n images for each class prompt, written as WebDataset shards (DIR/class-NNNNNN.tar: png, the
prompt as txt, a json with "prior": true). List them beside the instance shards in
data.train_urls; their loss is weighted by stage.module.prior_weight. Image j of each prompt starts
from the noise of seed + j, as ldm_train.generate draws it.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from ldm_train import quiet
from ldm_train.adapters.prior import PRIOR_KEY
from ldm_train.data.shards import shard_urls, shard_writer_pattern
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.errors import UserError

PREFIX = "class"


def png_bytes(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_class_images(
    images: torch.Tensor,
    prompts: Sequence[str],
    n: int,
    seed: int,
    out_dir: Path,
    shard_size: int = 1000,
) -> str:
    """n images per prompt (prompt-major, in [-1, 1]) as class shards; returns their URL."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    pattern = shard_writer_pattern(out_dir, PREFIX)
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=written.append) as writer:
        for index, image in enumerate(pixels):
            prompt, j = prompts[index // n], index % n
            meta = {"caption": prompt, PRIOR_KEY: True, "seed": seed + j}
            writer.write(
                {
                    "__key__": f"{PREFIX}-{index:08d}",
                    "png": png_bytes(image.cpu().numpy()),
                    "txt": prompt.encode("utf-8"),
                    "json": json.dumps(meta).encode("utf-8"),
                }
            )
    return shard_urls(out_dir, PREFIX, len(written))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_train.adapters.class_images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dir", help="the base model's export (or SD pipeline folder)")
    parser.add_argument("--prompt", action="append", required=True, help="a class prompt")
    parser.add_argument("--n", type=int, default=50, help="images per prompt (default 50)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the class shards")
    parser.add_argument("--seed", type=int, default=0, help="image j from seed + j")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the export's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the export's)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet.install()
    try:
        if args.n < 1:
            raise UserError(f"--n {args.n}: need at least 1 image per prompt")
        pipeline = Pipeline.load(args.export_dir, args.device)
        chosen = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed}
        options = replace(pipeline.sampling, **{k: v for k, v in chosen.items() if v is not None})
        images = pipeline.generate(args.prompt, args.n, options)
        urls = write_class_images(images, args.prompt, args.n, args.seed, args.out, args.shard_size)
    except UserError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(images)} class images; add them to the instance shards:")
    print(f"\"data.train_urls=['<instance shards>','{urls}']\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the commands (generate, evaluate, export, cache_latents) share on their command lines: a
parser whose errors are one line (ldm_train.rules.Parser), options typed and bounded by rules (ldm_train.rules), each option
declared once here, and the one-line report of a UserError with exit code 2.

An option not given is None and means "what the loaded export or run says": generate and evaluate
draw with the sampling the export recorded (its sampler, steps, guidance, seed, batch size and
image size) unless told otherwise (sampling_options).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import replace

import torch

from ldm_train import quiet
from ldm_train.diffusion.sampler import MAX_SIDE, SAMPLING_RULES, SamplingOptions
from ldm_train.errors import UserError
from ldm_train.rules import Int, typed

IMAGES_PER_PROMPT = Int(1, 10_000)
BATCH = Int(1, 4096)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """--sampler --steps --guidance --seed --batch-size: default the export's recorded ones."""
    rules = SAMPLING_RULES
    group = parser.add_argument_group("sampling (default: what the export recorded)")
    group.add_argument(
        "--sampler",
        type=typed(rules["sampler"]),
        help="ddim | euler | dpmpp; a flow model: euler | heun | dpmpp",
    )
    group.add_argument("--steps", type=typed(rules["steps"]), help="sampling steps")
    group.add_argument("--guidance", type=typed(rules["guidance"]), help="scale; 1: none")
    group.add_argument("--seed", type=typed(rules["seed"]), help="image j starts from seed + j")
    group.add_argument("--batch-size", type=typed(rules["batch_size"]), help="images per pass")


def sampling_options(args: argparse.Namespace, recorded: SamplingOptions) -> SamplingOptions:
    """The export's recorded sampling, with the options given on the command line instead."""
    given = {name: getattr(args, name) for name in SAMPLING_RULES}
    return replace(recorded, **{k: v for k, v in given.items() if v is not None})


def add_image_options(parser: argparse.ArgumentParser, sizes: bool = False) -> None:
    """--n, --prompts-file, --device (and --width/--height: default the export's image size)."""
    parser.add_argument("--n", type=typed(IMAGES_PER_PROMPT), default=4, help="images per prompt")
    parser.add_argument("--prompts-file", help="a UTF-8 text file with one prompt per line")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    if sizes:
        side = typed(Int(1, MAX_SIDE))
        parser.add_argument("--width", type=side, help="pixels (default: the export's size)")
        parser.add_argument("--height", type=side, help="pixels (default: the export's size)")


def device(name: str | None) -> str:
    """--device: the default (cuda if available), or the one named if this machine has it."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (chosen.index or 0) >= count:
            raise UserError(
                f"--device {name}: this machine has {count} visible GPU(s) "
                "(torch.cuda.device_count()); use --device cpu, or check CUDA_VISIBLE_DEVICES"
            )
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    return name


def run(prog: str, body: Callable[[], int]) -> int:
    """body() with logging set up; a UserError is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet.install()  # library notes a user cannot act on (ldm_train/quiet.py)
    try:
        return body()
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2

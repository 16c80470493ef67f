"""python -m ldm_train.adapters.merge EXPORT --lora PATH [--lora-scale S] [--lora ...] --out DIR

Merges LoRA adapters into a full export: the new folder is an export like any other (a diffusers
StableDiffusionPipeline folder where the base is one), whose weights are the base's plus each
adapter's update at its scale, so it generates what `python -m ldm_train.generate EXPORT --lora
PATH` generates, without the adapter at run time. DIR must not exist yet (or be empty); the folder
is written beside it and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm_train import quiet
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.errors import UserError
from ldm_train.formats.lora_file import LoraSpec, lora_specs

log = logging.getLogger("ldm_train.adapters.merge")


def merge(export_dir: str | Path, loras: Sequence[LoraSpec], out_dir: str | Path) -> Path:
    """The export at export_dir with the adapters fused into its weights, as a new export."""
    out_dir = Path(out_dir)
    if not loras:
        raise UserError("nothing to merge: give --lora PATH (repeatable)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out_dir} exists and is not empty: pick a new folder")
    pipeline = Pipeline.load(export_dir)
    pipeline.add_loras(loras)
    pipeline.fuse_loras()
    partial = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed run with our pid
    try:
        pipeline.save(partial)
        os.replace(partial, out_dir)  # also onto an empty folder
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_train.adapters.merge", description=__doc__)
    parser.add_argument("export_dir", help="the export the adapters were trained on")
    parser.add_argument("--lora", action="append", help="a LoRA adapter: folder or .safetensors")
    parser.add_argument("--lora-scale", action="append", type=float, help="per --lora (default 1)")
    parser.add_argument("--out", required=True, help="the merged export's folder (new)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet.install()
    try:
        out = merge(args.export_dir, lora_specs(args.lora, args.lora_scale), args.out)
    except UserError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"merged {len(args.lora)} adapter(s) into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

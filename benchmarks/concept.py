"""A concept the base model has never seen, taught with LoRA from a few dozen images: the shapes
maker draws stars (a shape the shapes set lacks), experiment=lora trains an adapter on `make
demo`'s U-Net export, and four figures compare the base and the adapted model:

- star prompts ("a large red star in the center on a blue background"): the share of images that
  show a star, base and adapted;
- the old prompts (data.prompts): the chain's judge (ldm_train.metrics.prompt_accuracy: the trained
  CLIP's zero-shot shape and colour), base and adapted.

The trained CLIP has never read "star" either, so its zero-shot classifier cannot name stars (its
accuracy on rendered stars is printed): star prompts are judged by the same CLIP's image features
instead, each image matched with renders of what its prompt asks (colour, size, position,
background) as each of the five shapes; the nearest names its shape (the judge's accuracy on
renders is printed). Colour on the star prompts is the zero-shot colour judge: CLIP knows those
words.

    python -m benchmarks.concept [--base outputs/shapes/unet/export]
      [--clip outputs/shapes/clip/export] [--steps 300]
      [--prior]   (DreamBooth: as many class images of the old prompts, drawn by the base, mixed in)
      [--scales 1 0.5] [OVERRIDE ...]   (more overrides over experiment=lora, e.g. adapter.rank=4)

make bench runs it when make demo's exports are there. On a shared machine run it with
OMP_NUM_THREADS=1 (it prints the CPU minutes it took).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from benchmarks.common import setup_process
from ldm_train.adapters.class_images import write_class_images
from ldm_train.config import compose_config
from ldm_train.data.shapes import (
    NEW_SHAPES,
    SHAPES,
    caption,
    make_shapes_dataset,
    render,
    sample_attributes,
)
from ldm_train.data.shards import shard_urls
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.sampler import SamplingOptions
from ldm_train.formats.clip_model import load_clip
from ldm_train.formats.lora_file import LoraSpec
from ldm_train.metrics.features import ClipImageFeatures
from ldm_train.metrics.prompt_accuracy import prompt_accuracy
from ldm_train.metrics.reference import prompt_labels
from ldm_train.metrics.zero_shot import parse_zero_shot
from ldm_train.train import train

NEW = NEW_SHAPES[0]
IMAGES = 40  # the concept's training images: a few dozen
N_PER_PROMPT = 10
SAMPLING = SamplingOptions(sampler="ddim", steps=50, guidance=1.5, seed=0, batch_size=80)
STEPS = 300
TRAIN = [  # over experiment=lora
    "data.image_size=32",
    "data.random_flip=false",  # captions name positions
    "data.batch_size=16",
    "model.lr=2e-3",
    "trainer.limit_val_batches=0",
    "logger=csv",
]


def as_tensor(images: list) -> torch.Tensor:
    """PIL images -> N x 3 x H x W in [-1, 1]."""
    pixels = torch.stack([torch.from_numpy(np.array(image)) for image in images])
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


def new_prompts(count: int = 8) -> list[dict]:
    """Prompts of the new shape: attributes drawn once (fixed seed), and their captions."""
    rng = random.Random("concept/prompts")
    attributes = [{**sample_attributes(rng, (NEW,)), "jitter": [0, 0]} for _ in range(count)]
    return [{"caption": caption(a), **a} for a in attributes]


class ShapeJudge:
    """Which shape an image shows: the nearest, in the CLIP's image embedding, of five renders of
    what its prompt asks (colour, size, position, background) as each shape. All else equal, the
    shape is what sets the five apart."""

    def __init__(self, clip_dir: Path):
        self.features = ClipImageFeatures(load_clip(clip_dir))
        self.shapes = [*SHAPES, NEW]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.features(images), dim=-1)

    def classify(self, images: torch.Tensor, attributes: list[dict]) -> list[str]:
        references = [render({**a, "shape": s}, 32) for a in attributes for s in self.shapes]
        candidates = self.embed(as_tensor(references)).view(len(images), len(self.shapes), -1)
        best = (candidates @ self.embed(images)[:, :, None]).squeeze(-1).argmax(-1)
        return [self.shapes[int(i)] for i in best]

    def accuracy_on_renders(self, count: int = 40) -> dict[str, float]:
        """Per shape, on renders with their position jitter (the references have none)."""
        rng, right = random.Random("concept/judge"), {}
        for shape in self.shapes:
            attributes = [sample_attributes(rng, (shape,)) for _ in range(count)]
            images = as_tensor([render(a, 32) for a in attributes])
            found = self.classify(images, [{**a, "jitter": [0, 0]} for a in attributes])
            right[shape] = sum(f == shape for f in found) / count
        return right


def measure(pipeline: Pipeline, judge: ShapeJudge, clip: Path, cfg) -> dict[str, float]:
    """The chain's judge on the old prompts; the shape judge and zero-shot colour on the new."""
    tasks = parse_zero_shot(cfg.data.zero_shot)
    captions, labels = prompt_labels(OmegaConf.to_container(cfg.data.prompts, resolve=True))
    old = pipeline.generate(captions, N_PER_PROMPT, SAMPLING)
    repeated = [label for label in labels for _ in range(N_PER_PROMPT)]
    figures = {"old_" + k: v for k, v in prompt_accuracy(clip, old, repeated, tasks).items()}
    stars = new_prompts()
    new = pipeline.generate([p["caption"] for p in stars], N_PER_PROMPT, SAMPLING)
    repeated = [p for p in stars for _ in range(N_PER_PROMPT)]
    found = judge.classify(new, repeated)
    figures[f"{NEW}_share"] = sum(shape == NEW for shape in found) / len(found)
    colours = [{"colour": p["colour"]} for p in repeated]
    colour = prompt_accuracy(clip, new, colours, {"colour": tasks["colour"]})
    figures[f"{NEW}_colour_acc"] = colour["colour_acc"]
    return figures


def judges(judge: ShapeJudge, clip: Path, cfg) -> str:
    """How well the shape judge and the zero-shot judge (with the new word added) tell stars."""
    right = ", ".join(f"{s} {v:.2f}" for s, v in judge.accuracy_on_renders().items())
    shape = parse_zero_shot(cfg.data.zero_shot)["shape"]
    words = {"shape": type(shape)(shape.label_key, (*SHAPES, NEW), shape.templates)}
    stars = new_prompts(40)
    images = as_tensor([render(a, 32) for a in stars])
    text = prompt_accuracy(clip, images, stars, words)["shape_acc"]
    return f"shape judge on renders: {right}; zero-shot with the word '{NEW}' on stars: {text:.2f}"


def concept_data(out: Path, base: Path, cfg, prior: bool) -> str:
    """The star shards (with prior, as many class images of the old prompts, drawn by the base)."""
    root = make_shapes_dataset(out / "stars", 32, IMAGES, 8, 1, 1, seed=1, shapes=(NEW,))
    urls = [shard_urls(root, "train", 1)]
    if prior:
        captions = prompt_labels(OmegaConf.to_container(cfg.data.prompts, resolve=True))[0]
        n = IMAGES // len(captions)
        images = Pipeline.load(base).generate(captions, n, SAMPLING)
        urls.append(write_class_images(images, captions, n, 0, out / "class"))
    return "[" + ",".join(f"'{url}'" for url in urls) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concept")
    parser.add_argument("--base", type=Path, default=Path("outputs/shapes/unet/export"))
    parser.add_argument("--clip", type=Path, default=Path("outputs/shapes/clip/export"))
    parser.add_argument("--out", type=Path, default=Path("outputs/concept"))
    parser.add_argument("--prior", action="store_true", help="DreamBooth's class images too")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"LoRA steps ({STEPS})")
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[1.0], help="--lora-scale values measured (1)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="more overrides over experiment=lora (e.g. adapter.rank=4)"
    )
    args = parser.parse_args()
    base, clip = args.base.resolve(), args.clip.resolve()
    if not (base.is_dir() and clip.is_dir()):
        print(f"concept: no export at {args.base} and {args.clip}: run make demo first")
        return
    setup_process()
    started, cpu = time.monotonic(), time.process_time()
    cfg = compose_config(["data=shapes"])  # the prompts and the zero-shot tasks
    judge = ShapeJudge(clip)
    print(judges(judge, clip, cfg))
    urls = concept_data(args.out.resolve(), base, cfg, args.prior)
    overrides = ["experiment=lora", f"model.pretrained={base}", f"data.train_urls={urls}", *TRAIN]
    overrides += [f"trainer.max_steps={args.steps}", f"paths.output_root={args.out.resolve()}"]
    overrides += args.overrides
    _, objects = train(compose_config(overrides))
    before = measure(Pipeline.load(base), judge, clip, cfg)
    for scale in args.scales:
        adapted = Pipeline.load(base)
        adapted.add_loras([LoraSpec(objects["export_dir"], scale)])
        after = measure(adapted, judge, clip, cfg)
        for name in before:
            print(
                f"{name:>18s}: base {before[name]:.3f} -> adapted {after[name]:.3f} (scale {scale})"
            )
    data = f"{IMAGES} {NEW} images" + (" + as many class images" if args.prior else "")
    wall, cpu = (time.monotonic() - started) / 60, (time.process_time() - cpu) / 60
    print(
        f"{data}, {args.steps} LoRA steps, {N_PER_PROMPT} images per prompt: {wall:.1f} min wall, "
        f"{cpu:.1f} min CPU of this process"
    )


if __name__ == "__main__":
    main()

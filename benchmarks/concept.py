"""A concept the base model has never seen, taught with LoRA from a few dozen images: the shapes
maker draws stars (a shape the shapes set lacks), experiment=lora trains an adapter on `make
demo`'s U-Net export, and four figures compare the base and the adapted model:

- star prompts ("a large red star in the center on a blue background", data.prompts with the shape
  swapped): the share of images that show a star, base and adapted;
- the old prompts (data.prompts): the chain's judge (ldm_train.metrics.prompt_accuracy, the trained
  CLIP's zero-shot shape and colour), base and adapted.

The trained CLIP has never read "star" either, so its zero-shot classifier cannot name stars (its
accuracy on rendered stars is printed as well): star images are judged by the same CLIP's image
features instead, each image classed with the nearest of five prototypes, the mean embedding of
rendered circles, squares, triangles, crosses and stars (the judge's accuracy on other renders is
printed). Colour on the star prompts is the zero-shot colour judge, whose words CLIP knows.

    python -m benchmarks.concept [--base outputs/shapes/unet/export] [--clip outputs/shapes/clip/export]
      [--prior]   (DreamBooth: as many class images of the old prompts, drawn by the base, mixed in)

make bench runs it when make demo's exports are there. Run it with OMP_NUM_THREADS=1 on a shared
machine (it prints the CPU minutes it took).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.common import setup_process
from ldm_train.adapters.class_images import write_class_images
from ldm_train.config import compose_config
from ldm_train.data.shapes import NEW_SHAPES, SHAPES, make_shapes_dataset, render, sample_attributes
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


def renders(shape: str, count: int, seed: int) -> torch.Tensor:
    """count rendered images of a shape, random attributes, in [-1, 1]."""
    rng = random.Random(f"concept/{shape}/{seed}")
    images = [render(sample_attributes(rng, (shape,)), 32) for _ in range(count)]
    pixels = torch.stack([torch.tensor(list(image.getdata())).view(32, 32, 3) for image in images])
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


class ShapeJudge:
    """Nearest prototype in CLIP image-embedding space, one per shape (mean of 64 renders)."""

    def __init__(self, clip_dir: Path):
        self.features = ClipImageFeatures(load_clip(clip_dir))
        self.shapes = [*SHAPES, NEW]
        prototypes = [self.embed(renders(shape, 64, seed=0)).mean(0) for shape in self.shapes]
        self.prototypes = torch.nn.functional.normalize(torch.stack(prototypes), dim=-1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.features(images), dim=-1)

    def shares(self, images: torch.Tensor) -> dict[str, float]:
        """The share of images classed as each shape."""
        classes = (self.embed(images) @ self.prototypes.T).argmax(-1)
        return {s: float((classes == i).float().mean()) for i, s in enumerate(self.shapes)}

    def accuracy_on_renders(self) -> float:
        """On renders it has not seen (another seed): its own accuracy, all shapes."""
        right = [self.shares(renders(shape, 32, seed=1))[shape] for shape in self.shapes]
        return sum(right) / len(right)


def star_prompts(prompts: list[dict]) -> list[dict]:
    """data.prompts with the shape swapped for the new one."""
    return [{**p, "caption": p["caption"].replace(p["shape"], NEW), "shape": NEW} for p in prompts]


def measure(pipeline: Pipeline, judge: ShapeJudge, clip: Path, cfg, prompts) -> dict[str, float]:
    tasks = parse_zero_shot(cfg.data.zero_shot)
    captions, labels = prompt_labels(prompts)
    old = pipeline.generate(captions, N_PER_PROMPT, SAMPLING)
    repeated = [label for label in labels for _ in range(N_PER_PROMPT)]
    figures = {"old_" + k: v for k, v in prompt_accuracy(clip, old, repeated, tasks).items()}
    captions, labels = prompt_labels(star_prompts(prompts))
    new = pipeline.generate(captions, N_PER_PROMPT, SAMPLING)
    figures[f"{NEW}_share"] = judge.shares(new)[NEW]
    colours = [{"colour": label["colour"]} for label in labels for _ in range(N_PER_PROMPT)]
    colour_task = {"colour": tasks["colour"]}
    figures[f"{NEW}_colour_acc"] = prompt_accuracy(clip, new, colours, colour_task)["colour_acc"]
    return figures


def concept_data(tmp: Path, base: Path, prompts: list[dict], prior: bool) -> str:
    """The star shards (and, with prior, as many class images of the old prompts by the base)."""
    root = make_shapes_dataset(tmp / "stars", 32, IMAGES, 8, 1, 1, seed=1, shapes=(NEW,))
    urls = [shard_urls(root, "train", 1)]
    if prior:
        captions = prompt_labels(prompts)[0]
        n = IMAGES // len(captions)
        images = Pipeline.load(base).generate(captions, n, SAMPLING)
        urls.append(write_class_images(images, captions, n, 0, tmp / "class"))
    return "[" + ",".join(f"'{url}'" for url in urls) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concept")
    parser.add_argument("--base", type=Path, default=Path("outputs/shapes/unet/export"))
    parser.add_argument("--clip", type=Path, default=Path("outputs/shapes/clip/export"))
    parser.add_argument("--out", type=Path, default=Path("outputs/concept"))
    parser.add_argument("--prior", action="store_true", help="DreamBooth's class images too")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"LoRA steps ({STEPS})")
    args = parser.parse_args()
    setup_process()
    started, cpu = time.monotonic(), time.process_time()
    base, clip = args.base.resolve(), args.clip.resolve()
    if not (base.is_dir() and clip.is_dir()):
        print(f"concept: no export at {args.base} and {args.clip}: run make demo first")
        return
    cfg = compose_config(["data=shapes"])  # its prompts and zero-shot tasks
    prompts = OmegaConf.to_container(cfg.data.prompts, resolve=True)
    judge = ShapeJudge(clip)
    zero_shot = parse_zero_shot(cfg.data.zero_shot)["shape"]
    words = {"shape": type(zero_shot)(zero_shot.label_key, (*SHAPES, NEW), zero_shot.templates)}
    stars = [{"shape": NEW}] * 32
    text_judge = prompt_accuracy(clip, renders(NEW, 32, seed=1), stars, words)["shape_acc"]
    print(
        f"judges on rendered images: prototypes {judge.accuracy_on_renders():.3f} (5 shapes); "
        f"zero-shot with the word '{NEW}' {text_judge:.3f} on stars"
    )
    urls = concept_data(args.out, base, prompts, args.prior)
    overrides = ["experiment=lora", f"model.pretrained={base}", f"data.train_urls={urls}", *TRAIN]
    overrides.append(f"trainer.max_steps={args.steps}")
    _, objects = train(compose_config([*overrides, f"paths.output_root={args.out}"]))
    before = measure(Pipeline.load(base), judge, clip, cfg, prompts)
    adapted = Pipeline.load(base)
    adapted.add_loras([LoraSpec(objects["export_dir"])])
    after = measure(adapted, judge, clip, cfg, prompts)
    for name in before:
        print(f"{name:>18s}: base {before[name]:.3f} -> adapted {after[name]:.3f}")
    data = f"{IMAGES} {NEW} images" + (" + as many class images" if args.prior else "")
    wall, cpu = (time.monotonic() - started) / 60, (time.process_time() - cpu) / 60
    print(
        f"{data}, {args.steps} steps, {N_PER_PROMPT} images per prompt; {wall:.1f} min wall, "
        f"{cpu:.1f} min CPU of this process"
    )


if __name__ == "__main__":
    main()

"""The README walked as a newcomer walks it: every command in a ```bash walk block, in the README's
order, on a fresh copy of the tree, shrunk as its "Try any command quickly" note says (debug=fast,
32 px images, a small copy of the embedded dataset, smaller validation samples). Each must end
with exit code 0; own shards without prompts must give stage=all a result."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from ldm_train.data.shapes import make_shapes_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WALK = re.compile(r"^```bash walk\n(.*?)^```", re.DOTALL | re.MULTILINE)
MAKE = {"make demo": ["-m", "ldm_train", "stage=all"]}  # what the Makefile's demo target runs
NOT_WALKED = {"make test"}
SAMPLES = [
    "stage.module.validation.samples_per_prompt=1",
    "stage.module.validation.metric_images=4",
    "stage.module.validation.sampling.steps=2",
]
CHAIN = [
    "stage.chain.unet.overrides=[" + ",".join(f"'{o}'" for o in SAMPLES) + "]",
    "stage.evaluate.n_per_prompt=1",
    "stage.evaluate.steps=2",
]


def walk_commands(readme: str) -> list[list[str]]:
    """The walked commands, in order, as `python` arguments."""
    commands = []
    for block in WALK.findall(readme):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command = " ".join(words[:2])
            if not words or command in NOT_WALKED:
                continue
            if command in MAKE:
                commands.append(MAKE[command] + words[2:])
                continue
            assert words[0] == "python" and words[1] == "-m", line
            commands.append(words[1:])
    return commands


def shrunk(args: list[str]) -> list[str]:
    """The README's "try it quickly" overrides, and smaller samples for the U-Net's validation."""
    module = args[1]
    if module == "ldm_train":
        extra = ["debug=fast"]
        extra += CHAIN if "stage=all" in args else SAMPLES if "stage=unet" in args else []
        extra += ["data.image_size=32"] if "data=webdataset" in args else []
        return [*args, *extra]
    if module in ("ldm_train.generate", "ldm_train.evaluate"):
        return [*args, "--steps", "2"]
    return args


def fresh_copy(to: Path) -> Path:
    """The tracked files of this checkout, as a fresh clone has them."""
    listed = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, to / name)
    return to


def own_photos(folder: Path, n: int = 60) -> None:
    """A user's folder: images of coloured blocks, each with a .txt caption."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    folder.mkdir(parents=True)
    for i in range(n):
        name, rgb = list(colours.items())[i % len(colours)]
        image = Image.new("RGB", (48, 40), (255, 255, 255))
        image.paste(rgb, (8 + i % 8, 8, 40, 32))
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {name} block on white")


def test_the_readme_walks_in_its_order(tmp_path, run_cli):
    tree = fresh_copy(tmp_path / "ldm_train")
    commands = walk_commands((tree / "README.md").read_text())
    assert len(commands) >= 8 and commands[0][:3] == ["-m", "ldm_train", "stage=all"]
    # The embedded dataset, smaller (the same folder and shard names: used as it is), and photos.
    shapes = dict(n_train=256, n_val=64, train_shards=16, val_shards=4, image_size=32, seed=0)
    make_shapes_dataset(tree / "data" / "shapes-32", progress=False, **shapes)
    own_photos(tree / "photos")
    for args in commands:
        result = run_cli(shrunk(args), tree, check=False, timeout=600)
        output = (result.stdout + result.stderr)[-3000:]
        assert result.returncode == 0, f"python {shlex.join(args)}\n{output}"
    outputs = tree / "outputs"
    # Own shards, no data.prompts: stage=all ends with a result, for the val shards' captions.
    assert "chain/minutes" in json.loads((outputs / "photos" / "all" / "results.json").read_text())
    assert (outputs / "photos" / "all" / "samples" / "grid.png").is_file()
    # After the demo, `stage=clip` started a run of its own beside the chain's; the rerun resumed it.
    assert (outputs / "shapes" / "clip-2" / "export").is_dir()
    assert not (outputs / "shapes" / "clip-3").exists()
    assert (tree / "samples" / "grid.png").is_file() and (tree / "eval" / "metrics.json").is_file()

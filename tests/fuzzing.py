"""What the fuzz tables share (tests/test_fuzz*.py): running a command in this process as its CLI
would (main(argv), exit code and stderr), with a deadline, and a record of every file under a
folder to show nothing was written outside the output folder; and the broken files they feed in."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import webdataset as wds

DEADLINE_S = 120  # a case that runs longer hangs


class Payload:
    """Unpickling it would create `marker` (as a real payload would run anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@contextlib.contextmanager
def deadline(seconds: int = DEADLINE_S) -> Iterator[None]:
    def hang(*_: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of main(argv) in this process, as `python -m ...` would end."""
    capsys.readouterr()
    with deadline():
        try:
            code = main(list(argv))
        except SystemExit as done:  # argparse's errors
            code = done.code
    return code, capsys.readouterr().err


# What stderr may hold beside the error: a command's progress bar (tqdm), and the notes of data
# skipped and counted (ldm_train/data/samples.py), which come before the error they lead to.
NOT_THE_ERROR = re.compile(r"^\s*(\w[\w ]*: +\d+%\||skipped \()")


def assert_one_line(code: int, err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not NOT_THE_ERROR.match(line)]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert " error: " in lines[0] and expected in lines[0], lines[0]


def assert_written_only_under(root: Path, before: dict[Path, int], allowed: Path) -> None:
    after = snapshot(root)
    changed = [p for p, t in after.items() if before.get(p) != t and not p.is_relative_to(allowed)]
    assert not changed, changed


# ---------------------------------------------------------------- broken files


def safetensors_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def broken_weights(root: Path) -> dict[str, Path]:
    """Weights files a careless or hostile hand makes: empty, a pickled list, a header length
    of 2**62 bytes, a header that places a tensor beyond the end of the file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.safetensors").write_bytes(b"")
    torch.save([1, 2, 3], root / "list.pt")
    (root / "huge.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    lying = {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}
    safetensors_file(root / "lying.safetensors", json.dumps(lying).encode(), b"\0" * 16)
    return {p.stem: p for p in root.iterdir()}


def pickled_folder(source: Path, to: Path, weights: str, marker: Path) -> Path:
    """A copy of a model folder whose weights are a pickle that would run code."""
    folder = shutil.copytree(source, to)
    for path in folder.rglob("*.safetensors"):
        path.unlink()
    (folder / weights).write_bytes(pickle.dumps({"w": Payload(marker)}))
    return folder


def damaged_exports(export: Path, root: Path, marker: Path) -> dict[str, Path]:
    """Copies of a unet export, each broken one way."""
    weights = "unet/diffusion_pytorch_model.safetensors"

    def copy(name: str) -> Path:
        return shutil.copytree(export, root / name)

    half = copy("half_written")
    (half / weights).unlink()
    truncated = copy("truncated")
    data = (truncated / weights).read_bytes()
    (truncated / weights).write_bytes(data[: len(data) // 2])
    pickled = copy("pickled")
    (pickled / weights).unlink()
    (pickled / "unet/diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    index = json.loads((export / "ldm_train_pipeline.json").read_text())
    exports = {"half_written": half, "truncated": truncated, "pickled": pickled}
    for name, text in {
        "malformed_index": "{not json",
        "index_of_a_list": "[1, 2]",
        "partial_index": json.dumps({k: v for k, v in index.items() if k != "image_size"}),
        "lying_index": json.dumps({**index, "sampling": {"steps": "many"}}),
        "huge_index_size": json.dumps({**index, "image_size": 10**9}),
    }.items():
        exports[name] = copy(name)
        (exports[name] / "ldm_train_pipeline.json").write_text(text)
    return exports


def run_copy(run: Path, to: Path, config: str | None = None, ckpt: bytes | None = None) -> Path:
    """A run folder (config.yaml, checkpoints/last.ckpt hard-linked, no export) with its config
    or checkpoint replaced."""
    (to / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", to / "config.yaml")
    if config is not None:
        (to / "config.yaml").write_text(config)
    if ckpt is None:
        os.link(run / "checkpoints" / "last.ckpt", to / "checkpoints" / "last.ckpt")
    else:
        (to / "checkpoints" / "last.ckpt").write_bytes(ckpt)
    return to


def tar_shard(path: Path, members: dict[str, dict[str, bytes]]) -> Path:
    """A tar shard of the given samples (key -> {extension: bytes})."""
    with wds.TarWriter(str(path)) as sink:
        for key, sample in members.items():
            sink.write({"__key__": key, **sample})
    return path

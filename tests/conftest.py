"""Shared fixtures: tiny shards of the embedded dataset, the real config composed for CPU tests,
tiny random upstream exports (VAE, CLIP) for stage=unet, and the runner of the real CLI."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import open_clip
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from omegaconf import DictConfig
from open_clip.model import set_model_preprocess_cfg
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_train.config import compose_config
from ldm_train.data.shapes import make_shapes_dataset
from ldm_train.formats.clip_model import save_clip
from ldm_train.formats.transformers_clip import clip_tokenizer

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs JOBS workers side by side
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first: with `make test`'s workers, the many short ones then fill
    in around them instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TINY = dict(image_size=32, n_train=256, n_val=64, train_shards=4, val_shards=2, seed=0)
# Fewer, shorter validation samples than the defaults: the tests check wiring, not quality.
QUICK_SAMPLES = (
    "stage.module.validation.samples_per_prompt=1",
    "stage.module.validation.metric_images=8",
    "stage.module.validation.sampling.steps=2",
)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict[str, str]:
    """A small copy of the embedded dataset: 4 train shards of 64 samples, 2 val shards of 32."""
    root = tmp_path_factory.mktemp("data") / "shapes-32"
    make_shapes_dataset(root, progress=False, **TINY)
    return {
        "root": str(root),
        "train_urls": f"{root}/train-{{000000..000003}}.tar",
        "val_urls": f"{root}/val-{{000000..000001}}.tar",
    }


MIXED_CANVASES = [[32, 32], [48, 32], [32, 48]]  # data=shapes_mixed's


@pytest.fixture(scope="session")
def tiny_mixed_shards(tmp_path_factory) -> dict[str, str]:
    """tiny_shards' samples on 32x32, 48x32 and 32x48 canvases (data=shapes_mixed's)."""
    root = tmp_path_factory.mktemp("data") / "shapes_mixed-32"
    make_shapes_dataset(root, progress=False, canvases=MIXED_CANVASES, **TINY)
    return {
        "root": str(root),
        "train_urls": f"{root}/train-{{000000..000003}}.tar",
        "val_urls": f"{root}/val-{{000000..000001}}.tar",
    }


@pytest.fixture
def mixed_cfg(tmp_path: Path, tiny_mixed_shards) -> Callable[..., DictConfig]:
    """make_cfg on the tiny mixed shards with data=shapes_mixed (one bucket per canvas)."""

    def compose(*overrides: str) -> DictConfig:
        base = tiny_run(tmp_path / "outputs", tiny_mixed_shards)
        return compose_config(["data=shapes_mixed", *base, *overrides])

    return compose


def tiny_run(output_root: Path, shards: dict[str, str]) -> list[str]:
    """CPU, CSV logging, the tiny shards, a few small batches and outputs under output_root."""
    return [
        f"paths.output_root={output_root}",
        f"paths.data_dir={output_root.parent / 'data'}",
        # Braces are Hydra syntax too: quote brace patterns inside the override.
        f"data.train_urls='{shards['train_urls']}'",
        f"data.val_urls='{shards['val_urls']}'",
        "data.make_dataset=null",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.batches_per_epoch=4",
        "data.shuffle_buffer=32",
        "logger=csv",
        "trainer.accelerator=cpu",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
    ]


@pytest.fixture
def make_cfg(tmp_path: Path, tiny_shards) -> Callable[..., DictConfig]:
    """compose_config with tiny_overrides (outputs under tmp_path), then the test's overrides."""

    def compose(*overrides: str, extra: Sequence[str] = ()) -> DictConfig:
        base = tiny_run(tmp_path / "outputs", tiny_shards)
        return compose_config([*base, *overrides, *extra])

    return compose


@pytest.fixture(scope="session")
def tiny_overrides(tiny_shards) -> Callable[[Path], list[str]]:
    """What make_cfg composes, as overrides, for outputs under a folder of the caller's choice
    (module- and session-scoped fixtures, CLI runs)."""
    return lambda output_root: tiny_run(Path(output_root), tiny_shards)


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    """A random diffusers AutoencoderKL: 32 px -> 4 x 8 x 8, scaling_factor 0.5."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 16, 16],
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.5,
    )


def write_tiny_vae(path: Path, latent_channels: int = 4) -> Path:
    """tiny_vae's folder."""
    tiny_vae(latent_channels).save_pretrained(path)
    return path


def tiny_unet(channels: int = 4, **config) -> UNet2DConditionModel:
    """A random diffusers UNet2DConditionModel for 8 x 8 inputs of `channels` channels (tiny_vae's
    latents unless told) with cross-attention of width 32; config: more of its arguments."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        **config,
    )


@pytest.fixture(scope="session")
def make_unet() -> Callable[..., UNet2DConditionModel]:
    """make(channels=4, **config) -> tiny_unet(channels, **config), random weights."""
    return tiny_unet


def tiny_sd_pipeline() -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of tiny random parts in SD 1.x's layout: a CLIPTextModel (width 32,
    3 layers, context 24) whose tokenizer pads with the end token as SD 1.x's does, tiny_vae and a
    U-Net for its 4 x 8 x 8 latents."""
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=24,
        )
    ).eval()
    tokenizer = clip_tokenizer(24)
    tokenizer.pad_token = "<|endoftext|>"
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(attention_head_dim=4),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> tuple[StableDiffusionPipeline, Path]:
    """(tiny_sd_pipeline(), the folder it is saved in with save_pretrained): Stable Diffusion's
    layout, nothing downloaded. Tests that change the pipeline object put it back."""
    pipeline = tiny_sd_pipeline()
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipeline.save_pretrained(folder)
    return pipeline, folder


TINY_CLIP_CARD = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_open_clip(quick_gelu: bool = False, **text_cfg) -> tuple[open_clip.CLIP, dict]:
    """(a random open_clip CLIP in eval mode, its card): TINY_CLIP_CARD with text_cfg on top."""
    card = copy.deepcopy(TINY_CLIP_CARD)
    card["text_cfg"].update(text_cfg)
    if quick_gelu:
        card["quick_gelu"] = True
    torch.manual_seed(0)
    model = open_clip.CLIP(**card).eval()
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    set_model_preprocess_cfg(model, {"size": 32, "mean": mean, "std": std})  # to save it
    return model, card


def write_tiny_clip(path: Path) -> Path:
    """A random open_clip CLIP in the layout stage=clip exports (text width 32, 2 layers)."""
    model, card = tiny_open_clip()
    return save_clip(model, card, path, "tiny-clip")


@pytest.fixture(scope="session")
def make_open_clip() -> Callable[..., tuple[open_clip.CLIP, dict]]:
    """make(quick_gelu=False, **text_cfg) -> (a random open_clip CLIP in eval mode, its card);
    3 text layers unless told, so that the penultimate layer is not the first."""
    return lambda quick_gelu=False, **text_cfg: tiny_open_clip(
        quick_gelu, **{"layers": 3, **text_cfg}
    )


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> dict[str, Path]:
    """Tiny random exports of the VAE and the CLIP for stage=unet."""
    root = tmp_path_factory.mktemp("upstream")
    return {"vae": write_tiny_vae(root / "vae"), "clip": write_tiny_clip(root / "clip")}


@pytest.fixture(scope="session")
def unet_overrides(upstream) -> list[str]:
    """stage=unet on the tiny upstream exports, with quick validation samples."""
    return [
        "stage=unet",
        f"stage.vae={upstream['vae']}",
        f"stage.text_encoder={upstream['clip']}",
        *QUICK_SAMPLES,
    ]


@pytest.fixture
def unet_cfg(make_cfg, unet_overrides) -> Callable[..., DictConfig]:
    def compose(*overrides: str) -> DictConfig:
        return make_cfg(*unet_overrides, *overrides)

    return compose


def train_tiny_unet(tmp: Path, tiny_overrides, unet_overrides, *extra: str) -> tuple:
    """(the stage, its export folder): a U-Net trained for 2 steps on the tiny VAE and CLIP, by
    train(), in its run directory under tmp (outputs/shapes/unet); extra: more overrides."""
    from ldm_train.train import train

    cfg = compose_config(
        [
            *tiny_overrides(tmp / "outputs"),
            *unet_overrides,
            "logger=none",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            *extra,
        ]
    )
    _, objects = train(cfg)
    return objects["module"], objects["export_dir"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_overrides, unet_overrides) -> tuple:
    """train_tiny_unet's (stage, export folder) with the default settings."""
    return train_tiny_unet(tmp_path_factory.mktemp("trained"), tiny_overrides, unet_overrides)


def cli_env(**extra: str) -> dict[str, str]:
    """A CLI subprocess's environment: no W&B settings or credentials in it, no LDM_TRAIN_*, one
    torch thread, and this checkout (plus tests/, for test callbacks named by _target_) first on
    the path, whatever is installed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "LDM_TRAIN"))}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


class ForkedProcess:
    """What the tests use of a subprocess.Popen, for a run the fork server started: pid, poll,
    wait, communicate (the output so far, from its file), send_signal, kill, returncode."""

    def __init__(self, args: list[str], pid: int, out: Path, err: Path | None, rc: Path):
        self.args, self.pid, self.returncode = args, pid, None
        self.out, self.err, self.rc = out, err, rc
        self.stdout = open(out, errors="replace")  # noqa: SIM115 - read as the run writes it

    def poll(self) -> int | None:
        if self.returncode is None and self.rc.is_file():
            self.returncode = int(self.rc.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        self.wait(timeout)
        errors = None if self.err is None else self.err.read_text(errors="replace")
        return self.stdout.read(), errors

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The client of tests/forkserver.py: `python -m MODULE ARGS` forked from a process that has
    imported the libraries already (about 9 s of CPU saved per run; see its docstring)."""

    def __init__(self, scratch: Path):
        self.scratch, self.pending = scratch, b""
        self.server = subprocess.Popen(
            [sys.executable, str(TESTS / "forkserver.py")],
            cwd=REPO,
            env=cli_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:  # about 10 s on a quiet machine
            self.ready = self.answer(600).get("ready", False)
        except TimeoutError:  # a machine too busy to import in time: fresh interpreters instead
            self.server.kill()
            self.ready = False

    def answer(self, timeout: float) -> dict:
        """The server's next line, or TimeoutError; {} if the server has gone."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if select.select([self.server.stdout], [], [], left)[0]:
                chunk = os.read(self.server.stdout.fileno(), 4096)
                if not chunk:
                    return {}
                self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def start(
        self, args: Sequence[str], cwd: Path, env: dict, merged: bool, new_session: bool
    ) -> ForkedProcess:
        base = self.scratch / str(time.monotonic_ns())
        out, err, rc = (base.with_suffix(suffix) for suffix in (".out", ".err", ".rc"))
        err = out if merged else err
        paths = {"out": str(out), "err": str(err), "returncode": str(rc)}
        request = {"args": list(args), "cwd": str(cwd), "env": env, "new_session": new_session}
        self.server.stdin.write((json.dumps(request | paths) + "\n").encode())
        self.server.stdin.flush()
        pid = self.answer(60)["pid"]
        out.touch()
        return ForkedProcess([sys.executable, *args], pid, out, None if merged else err, rc)

    def run(
        self, args: Sequence[str], cwd: Path, env: dict, timeout: float
    ) -> subprocess.CompletedProcess:
        process = self.start(args, cwd, env, merged=False, new_session=False)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(60)
            raise
        stdout, stderr = process.communicate()
        process.stdout.close()
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="session")
def fork_server(
    tmp_path_factory,
) -> Iterator[Callable[[Sequence[str], dict, bool], ForkServer | None]]:
    """server(args, env, fresh) -> the tests' fork server (started at first use) for this run, or
    None for a fresh interpreter: runs other than `python -m ...`, runs that set HOME or
    PYTHONPATH (read while importing), and runs that ask (fresh: e.g. to see what importing prints)."""
    servers: list[ForkServer] = []

    def server(args: Sequence[str], env: dict, fresh: bool) -> ForkServer | None:
        if args[0] != "-m" or fresh or {"HOME", "PYTHONPATH"} & set(env):
            return None
        if not servers:
            servers.append(ForkServer(tmp_path_factory.mktemp("forkserver")))
        return servers[0] if servers[0].ready else None

    yield server
    for each in servers:
        each.close()


@pytest.fixture(scope="session")
def run_cli(fork_server) -> Callable[..., subprocess.CompletedProcess]:
    """run_cli(args, cwd, check=True, timeout=300, fresh=False, **env): `python <args>` to its end
    (forked from the tests' warm server where it can be: fork_server)."""

    def run(
        args: Sequence[str],
        cwd: Path,
        check: bool = True,
        timeout: int = 300,
        fresh: bool = False,
        **env: str,
    ) -> subprocess.CompletedProcess:
        server = fork_server(args, env, fresh)
        if server is not None:
            result = server.run(args, cwd, cli_env(**env), timeout)
        else:
            result = subprocess.run(
                [sys.executable, *args],
                cwd=cwd,
                env=cli_env(**env),
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            )
        if check:
            assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        return result

    return run


@pytest.fixture(scope="session")
def start_cli(fork_server) -> Callable[..., subprocess.Popen | ForkedProcess]:
    """start_cli(args, cwd, new_session=False, fresh=False, **env): `python <args>` in the
    background, stdout and stderr merged; new_session: in a process group of its own (for
    os.killpg). Forked from the tests' warm server where it can be (fork_server)."""

    def start(
        args: Sequence[str], cwd: Path, new_session: bool = False, fresh: bool = False, **env: str
    ) -> subprocess.Popen | ForkedProcess:
        server = fork_server(args, env, fresh)
        if server is not None:
            return server.start(args, cwd, cli_env(**env), True, new_session)
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=cli_env(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_session,
        )

    return start


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., None]:
    """wait_for(path, process, timeout=120): until the file appears; fails if the process ends
    first (showing its output) or the time runs out."""

    def wait(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not path.is_file():
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.05)

    return wait


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A TCP port free on localhost now (for a process group's rendezvous)."""

    def find() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    return find


@pytest.fixture(scope="session")
def run_together(start_cli) -> Callable[..., list[tuple[int, str]]]:
    """run_together([(args, env), ...], cwd, timeout=300): `python <args>` for each at once (the
    ranks or nodes of one job), waited for together; [(return code, output)]. On a timeout each
    is killed with its children (torchrun's workers) and the test fails: a hung collective fails
    its test, not the whole suite."""

    def run(commands: Sequence[tuple[Sequence[str], dict]], cwd: Path, timeout: float = 300):
        # each in its own process group: killed with its children
        processes = [start_cli(args, cwd, new_session=True, **env) for args, env in commands]
        deadline = time.monotonic() + timeout
        try:
            outputs = [
                p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in processes
            ]
            return [(p.returncode, output) for p, output in zip(processes, outputs, strict=True)]
        except subprocess.TimeoutExpired:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            outputs = [process.communicate()[0][-3000:] for process in processes]
            pytest.fail(f"timed out after {timeout} s:\n" + "\n".join(outputs))

    return run

"""LoRA (adapter=lora): only the adapter trains and is checkpointed; its export loads in diffusers
(no missing or unexpected keys, the same images as our generate --lora), in kohya's layout too;
merged into an export it draws what the unmerged adapter draws; one-line errors for what cannot
work; DreamBooth's class images and their loss weight."""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers.integrations.peft
from conftest import QUICK_SAMPLES, tiny_sd_pipeline
from diffusers import SD3Transformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from omegaconf import OmegaConf
from PIL import Image
from test_diffusers_export import PROMPTS, diffusers_images
from transformers import CLIPTextModel

from ldm_train.adapters.class_images import main as class_images_main
from ldm_train.adapters.class_images import write_class_images
from ldm_train.adapters.lora import LoraAdapter, check_adapter_state
from ldm_train.adapters.merge import merge
from ldm_train.adapters.prior import prior_flags, prior_losses
from ldm_train.atomic import MARKER
from ldm_train.checks import check_values
from ldm_train.config import compose_config
from ldm_train.data.datamodule import expand_urls
from ldm_train.data.stream import LoaderConfig, build_pipeline
from ldm_train.diffusion.conditioning import Conditioning
from ldm_train.diffusion.loss import DiffusionObjective
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.sampler import SamplingOptions
from ldm_train.diffusion.schedule import build_noise_scheduler
from ldm_train.diffusion.text_encoder import TransformersTextEncoder
from ldm_train.errors import UserError
from ldm_train.export import export_checkpoint
from ldm_train.formats.lora_file import INFO, KOHYA_WEIGHTS, WEIGHTS, LoraSpec
from ldm_train.generate import main as generate_main
from ldm_train.stages.unet import check_ema_decay
from ldm_train.train import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

OPTIONS = SamplingOptions(steps=3, guidance=2.0, seed=1)
# A U-Net and text encoder adapter, both written in either layout; a high lr so that 3 steps
# move the adapter visibly away from its zero start.
LORA = [
    "adapter=lora",
    "adapter.rank=4",
    "adapter.alpha=8",
    "adapter.text_encoder=true",
    "adapter.text_encoder_lr=0.01",
    "adapter.kohya=true",
    "model.ema_decay=null",
    "model.lr=0.02",
    "lr_scheduler=constant",
    "model.warmup_steps=0",
]


def base_overrides(base: Path) -> list[str]:
    """stage=unet on an export: its U-Net (model.pretrained), VAE and CLIPTextModel."""
    return [
        "stage=unet",
        f"model.pretrained={base}",
        f"stage.vae={base}",
        f"stage.text_encoder={base}",
        *QUICK_SAMPLES,
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An export (what `stage=unet` writes, a StableDiffusionPipeline folder) of tiny random
    Stable Diffusion parts: the model the adapters adapt."""
    parts = tiny_sd_pipeline()
    pipeline = Pipeline(
        unet=parts.unet,
        scheduler=build_noise_scheduler(),
        vae=parts.vae,
        text_encoder=TransformersTextEncoder(parts.text_encoder, parts.tokenizer),
        image_size=32,
    )
    return pipeline.save(tmp_path_factory.mktemp("base") / "export")


@pytest.fixture(scope="module")
def class_shards(tmp_path_factory) -> str:
    """Two shards of 8 class images each (random pixels: the wiring, not DreamBooth's effect)."""
    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    out = tmp_path_factory.mktemp("class")
    return write_class_images(images, ["a shape", "a small shape"], 8, 0, out, shard_size=8)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_overrides, base, class_shards) -> tuple:
    """(the stage, its export, its run dir, its metrics): 3 steps of adapter=lora on the base
    export, with class images among the instance images."""
    tmp = tmp_path_factory.mktemp("lora")
    overrides = tiny_overrides(tmp / "outputs")
    instance = next(o for o in overrides if o.startswith("data.train_urls="))
    urls = instance.split("=", 1)[1]
    overrides[overrides.index(instance)] = f"data.train_urls=[{urls},'{class_shards}']"
    cfg = compose_config(
        [
            *overrides,
            *base_overrides(base),
            *LORA,
            "logger=none",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=1",
        ]
    )
    metrics, objects = train(cfg)
    return objects["module"], objects["export_dir"], objects["run_dir"], metrics


def base_parts(export: Path) -> tuple[dict, dict]:
    unet = UNet2DConditionModel.from_pretrained(export / "unet", local_files_only=True)
    text = CLIPTextModel.from_pretrained(export / "text_encoder", local_files_only=True)
    return unet.state_dict(), text.state_dict()


def base_name(name: str) -> str:
    """peft's wrapped layer -> the base model's name (x.to_q.base_layer.weight -> x.to_q.weight)."""
    return name.replace(".base_layer", "")


def test_only_the_adapter_trains_and_the_checkpoint_holds_no_base_weight(lora_run, base):
    module, export, run_dir, metrics = lora_run
    unet_base, text_base = base_parts(base)
    for model, base in ((module.net, unet_base), (module.text_model, text_base)):
        adapter = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert adapter and all(p.requires_grad for p in adapter.values())
        assert any(p.abs().max() > 0 for n, p in adapter.items() if "lora_B" in n)  # it moved
        frozen = {base_name(n): p for n, p in model.state_dict().items() if "lora_" not in n}
        assert frozen.keys() == base.keys()
        assert all(torch.equal(frozen[n], base[n]) for n in base)  # bitwise the base
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    names = set(checkpoint["state_dict"])
    assert names == {n for n, p in module.named_parameters() if p.requires_grad}
    assert all("lora_" in name for name in names)
    assert any(name.startswith("text_model.") for name in names)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [group["initial_lr"] for group in groups] == [0.02, 0.01]  # the text encoder's own
    adapter_bytes = sum(v.numel() * v.element_size() for v in checkpoint["state_dict"].values())
    base_bytes = sum(v.numel() * 4 for v in [*unet_base.values(), *text_base.values()])
    assert adapter_bytes * 100 < base_bytes
    assert {path.name for path in export.iterdir()} == {WEIGHTS, KOHYA_WEIGHTS, INFO, MARKER}
    assert {"train/mse", "train/prior_mse"} <= set(metrics)  # the last batch held class images


def test_an_export_from_the_checkpoint_is_the_same_adapter(lora_run, tmp_path):
    """python -m ldm_train.export: the stage rebuilt from its config (the base from
    model.pretrained), the checkpoint's adapter loaded into it."""
    _, export, run_dir, _ = lora_run
    again = export_checkpoint(run_dir, tmp_path / "again")
    first, second = (safetensors.torch.load_file(folder / WEIGHTS) for folder in (export, again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.fixture
def diffusers_pipeline(base, monkeypatch) -> StableDiffusionPipeline:
    """A fresh StableDiffusionPipeline of the tiny SD folder, whose LoRA loader may adapt its text
    encoder: transformers' route (load_adapter) asks for peft >= 0.22, newer than the newest this
    machine's index has (0.21.2), and works with it (ldm_train loads the text encoder's adapter
    with peft directly)."""
    monkeypatch.setattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "0.21.0")
    return StableDiffusionPipeline.from_pretrained(
        base, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )


def images_of(pipeline: Pipeline) -> torch.Tensor:
    return (pipeline.generate(PROMPTS, 2, OPTIONS) + 1) / 2


def adapter_weights(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """An adapter's weights by the base layer they sit on."""
    suffix = f".{name}.weight"
    return {
        base_name(n).removesuffix(suffix): p
        for n, p in model.named_parameters()
        if "lora_" in n and n.endswith(suffix)
    }


def assert_same_adapter(loaded: torch.nn.Module, name: str, trained: torch.nn.Module) -> None:
    theirs, ours = adapter_weights(loaded, name), adapter_weights(trained, "default")
    assert theirs.keys() == ours.keys() and theirs
    assert all(torch.equal(theirs[key], ours[key]) for key in theirs)


def test_diffusers_loads_our_adapter_whole_and_draws_what_generate_draws(
    lora_run, base, diffusers_pipeline, caplog
):
    module, export, _, _ = lora_run
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            diffusers_pipeline.load_lora_weights(export, adapter_name="ours")
    finally:
        diffusers_logging.disable_propagation()
    assert not [r for r in caplog.records if "keys" in r.getMessage()]  # nothing missing/unexpected
    assert_same_adapter(diffusers_pipeline.unet, "ours", module.net)
    assert_same_adapter(diffusers_pipeline.text_encoder, "ours", module.text_model)
    pipeline = Pipeline.load(base)
    before = images_of(pipeline)
    pipeline.add_loras([LoraSpec(export)])  # what generate --lora does
    ours = images_of(pipeline)
    assert (diffusers_images(diffusers_pipeline, 32, 2, OPTIONS) - ours).abs().max() <= 1e-3
    assert (ours - before).abs().max() > 1e-2  # the adapter changes the images


def test_the_kohya_layout_round_trips_through_diffusers_loader(lora_run, base, diffusers_pipeline):
    module, export, _, _ = lora_run
    kohya = safetensors.torch.load_file(export / KOHYA_WEIGHTS)
    assert all(key.startswith(("lora_unet_", "lora_te_text_model_")) for key in kohya)
    alphas = [value for key, value in kohya.items() if key.endswith(".alpha")]
    assert alphas and all(float(alpha) == 8.0 for alpha in alphas)  # adapter.alpha, not the rank
    diffusers_pipeline.load_lora_weights(export, weight_name=KOHYA_WEIGHTS, adapter_name="kohya")
    assert_same_adapter(diffusers_pipeline.unet, "kohya", module.net)
    assert_same_adapter(diffusers_pipeline.text_encoder, "kohya", module.text_model)
    pipeline = Pipeline.load(base)
    pipeline.add_loras([LoraSpec(export / KOHYA_WEIGHTS)])  # generate reads it too
    assert (
        diffusers_images(diffusers_pipeline, 32, 2, OPTIONS) - images_of(pipeline)
    ).abs().max() <= 1e-3


def test_a_merged_export_draws_what_the_adapter_draws(lora_run, base, tmp_path):
    _, export, _, _ = lora_run
    specs = [LoraSpec(export, 0.7)]
    merged = merge(base, specs, tmp_path / "merged")
    assert (merged / "model_index.json").is_file()
    weights = [
        safetensors.torch.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
        for folder in (base, merged)
    ]
    assert weights[0].keys() == weights[1].keys()  # no adapter layer left: plain U-Net weights
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    unmerged = Pipeline.load(base)
    unmerged.add_loras(specs)
    assert (images_of(Pipeline.load(merged)) - images_of(unmerged)).abs().max() <= 1e-3
    with pytest.raises(UserError, match="exists and is not empty"):
        merge(base, specs, tmp_path / "merged")


def test_generate_takes_several_adapters_with_scales(lora_run, base, tmp_path):
    _, export, _, _ = lora_run
    kohya = export / KOHYA_WEIGHTS
    args = [str(base), "--prompt", PROMPTS[0], "--n", "1", "--steps", "2", "--seed", "1"]
    adapters = ["--lora", str(export), "--lora", str(kohya), "--lora-scale", "0.5"]
    assert generate_main([*args, *adapters, "--out", str(tmp_path / "out")]) == 0
    written = torch.from_numpy(np.array(Image.open(tmp_path / "out" / "000-000.png")))
    pipeline = Pipeline.load(base)
    options = SamplingOptions(steps=2, guidance=4.0, seed=1)
    before = pipeline.generate(PROMPTS[:1], 1, options)
    pipeline.add_loras([LoraSpec(export, 0.5), LoraSpec(kohya, 1.0)])  # the second at its default
    after = pipeline.generate(PROMPTS[:1], 1, options)
    pixels = ((after[0] + 1) * 127.5).clamp(0, 255).permute(1, 2, 0)
    assert (written.float() - pixels).abs().max() <= 1  # the PNG's rounding
    assert (after - before).abs().max() > 1e-2
    missing = [str(base), "--prompt", "x", "--lora", str(tmp_path / "missing")]
    assert generate_main([*missing, "--out", str(tmp_path / "x")]) == 2


class FakeTower(torch.nn.Module):
    """Stands for an open_clip text tower (what a stage=clip export loads as)."""

    width = 32


def test_what_cannot_work_is_one_line_each(make_cfg):
    parts = tiny_sd_pipeline()
    with pytest.raises(UserError, match="adapts existing weights: set model.pretrained"):
        LoraAdapter().attach(parts.unet, None, Conditioning())
    with pytest.raises(UserError, match="trains without an EMA: set model.ema_decay=null"):
        check_ema_decay(0.999, LoraAdapter())
    adapter = LoraAdapter(text_encoder=True)
    with pytest.raises(UserError, match="needs a transformers CLIPTextModel"):
        adapter.text_model(Conditioning(FakeTower()))
    encoder = TransformersTextEncoder(parts.text_encoder, parts.tokenizer)
    with pytest.raises(UserError, match="hidden states cannot be kept"):
        adapter.text_model(Conditioning(encoder, cache_size=8))
    with pytest.raises(UserError, match="adapter.rank=0 must be an integer >= 1"):
        LoraAdapter(rank=0)
    with pytest.raises(
        UserError, match=r"adapter.dropout=1.0 must be a finite number >= 0 and < 1"
    ):
        LoraAdapter(dropout=1.0)
    with pytest.raises(UserError, match="adapter.alpha=0 must be a finite number > 0"):
        check_values(make_cfg("stage=unet", "adapter=lora", "adapter.alpha=0"))  # before a build
    with pytest.raises(UserError, match="no cross_kv target modules for a Linear: set adapter"):
        LoraAdapter(target_modules="cross_kv").denoiser_targets(torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="adapts stage=unet only"):
        train(make_cfg("stage=vae", "adapter=lora"))
    names, known = {"net.a.lora_A.weight"}, {"net.a.lora_A.weight", "net.a.weight"}
    check_adapter_state({"net.a.lora_A.weight": 0, "net.a.weight": 0}, names, known)  # a whole one
    for state in ({"net.a.weight": 0}, {"net.a.lora_A.weight": 0, "net.b.lora_A.weight": 0}):
        with pytest.raises(UserError, match="resume with the adapter settings"):
            check_adapter_state(state, names, known)


def adapted_layers(net: torch.nn.Module) -> set[str]:
    """Which projections of which attention peft put an adapter beside: {"attn2.to_k", ...}."""
    names = [name for name, _ in net.named_modules() if name.endswith(".lora_A")]
    return {re.search(r"(attn\d?\..+)\.lora_A$", name).group(1) for name in names}


def tiny_sd3() -> SD3Transformer2DModel:
    sizes = dict(joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16)
    return SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, pos_embed_max_size=8, **sizes,
    )  # fmt: skip


UNET_ATTENTION = {
    f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")
}
SD3_ATTENTION = {f"attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")} | {
    f"attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
}


@pytest.mark.parametrize(
    ("targets", "unet", "sd3"),
    [
        (None, UNET_ATTENTION, SD3_ATTENTION),
        ("attention", UNET_ATTENTION, SD3_ATTENTION),
        ("cross_kv", {"attn2.to_k", "attn2.to_v"}, {"attn.add_k_proj", "attn.add_v_proj"}),
        (["to_q"], {"attn1.to_q", "attn2.to_q"}, {"attn.to_q"}),
    ],
)
def test_target_module_sets_name_the_layers_of_each_network(targets, unet, sd3):
    for net, expected in ((tiny_sd_pipeline().unet, unet), (tiny_sd3(), sd3)):
        LoraAdapter(target_modules=targets).attach(net, "base", Conditioning())
        assert adapted_layers(net) == expected


@pytest.mark.parametrize("value", ["cross", "[]", "3"])
def test_a_wrong_target_set_is_one_line_before_anything_is_built(make_cfg, value):
    cfg = make_cfg("stage=unet", "adapter=lora", f"adapter.target_modules={value}")
    allowed = "must be one of: attention, cross_kv or a non-empty list of strings or null"
    with pytest.raises(UserError, match=f"^adapter.target_modules=.* {allowed}$"):
        check_values(cfg)
    with pytest.raises(UserError, match=allowed):  # built from code
        LoraAdapter(target_modules=OmegaConf.to_object(cfg.adapter)["target_modules"])


def test_class_images_weigh_apart_and_sum_to_the_plain_loss(class_shards):
    stream = build_pipeline(expand_urls(class_shards), LoaderConfig(batch_size=4), train=False)
    batch = next(iter(stream))
    assert prior_flags(batch) == [True] * 4
    assert batch["caption"][0] == "a shape"
    assert prior_flags({"meta": [{}, {"shape": "circle"}]}) is None
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t, context = torch.randint(0, 1000, (6,)), torch.randn(6, 3, 32)
    weights = torch.randn(4, 4, 1, 1)

    def predictor(ctx):
        shift = ctx.mean(dim=(1, 2))[:, None, None, None]  # row by row, as cross-attention is
        return lambda x, steps: torch.einsum("oc,bchw->bohw", weights[..., 0, 0], x) + shift

    objective, scheduler = DiffusionObjective(snr_gamma=5.0), build_noise_scheduler()
    args = (objective, lambda rows: predictor(context[rows]), scheduler, x0, t, noise)
    prior = [False, True, False, False, True, False]
    plain = objective(predictor(context), scheduler, x0, t, noise)["mse"]
    split = prior_losses(*args, prior, 1.0)
    assert split.keys() == {"mse", "prior_mse"}
    torch.testing.assert_close(split["mse"] + split["prior_mse"], plain)  # weight 1: the plain mean
    halved = prior_losses(*args, prior, 0.5)
    torch.testing.assert_close(halved["prior_mse"], split["prior_mse"] / 2)
    torch.testing.assert_close(halved["mse"], split["mse"])


def cli_run(tiny_overrides, out: Path, base: Path, class_shards: str) -> list[str]:
    """The CLI on the base export with both adapters, dropout on, class images among the data."""
    overrides = tiny_overrides(out)
    instance = next(o for o in overrides if o.startswith("data.train_urls="))
    urls = instance.split("=", 1)[1]
    overrides[overrides.index(instance)] = f"data.train_urls=[{urls},'{class_shards}']"
    return [
        "-m",
        "ldm_train",
        *overrides,
        *base_overrides(base),
        *LORA,
        "adapter.dropout=0.1",
        "trainer.limit_val_batches=0",
    ]


@pytest.mark.slow
def test_kill_9_and_resume_is_exact(tmp_path, tiny_overrides, base, class_shards, run_cli):
    """The adapter of a run killed with -9 after step 3 (checkpoint at 2) and rerun equals the
    adapter of a run that never stopped, bit for bit: the base comes again from model.pretrained,
    the adapter from the checkpoint, dropout from the step's generator."""
    args = [*cli_run(tiny_overrides, tmp_path / "out", base, class_shards), "trainer.max_steps=5"]
    args += ["checkpoint_every_n_steps=2", "data.batches_per_epoch=4"]
    run_cli([*args, "experiment_name=straight"], tmp_path)
    killed = [*args, "experiment_name=killed"]
    kill = "+callbacks.kill={_target_:test_resume.KillAt,step:3}"
    result = run_cli([*killed, kill], tmp_path, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    rerun = run_cli(killed, tmp_path)
    assert "continuing from" in rerun.stdout + rerun.stderr
    files = [
        tmp_path / "out" / name / "unet" / "export" / WEIGHTS for name in ("straight", "killed")
    ]
    straight, resumed = (safetensors.torch.load_file(file) for file in files)
    assert straight.keys() == resumed.keys() and straight
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


@pytest.mark.slow
def test_two_processes_train_one_adapter(tmp_path, tiny_overrides, base, class_shards, run_cli):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    args = [*cli_run(tiny_overrides, tmp_path / "out", base, class_shards), *ddp]
    run_cli([*args, "trainer.precision=32-true", "trainer.max_steps=2"], tmp_path)
    run_dir = tmp_path / "out" / "shapes" / "unet"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all("lora_" in name for name in checkpoint["state_dict"])
    exported = safetensors.torch.load_file(run_dir / "export" / WEIGHTS)
    assert any(key.startswith("text_encoder.") for key in exported)
    pipeline = Pipeline.load(base)
    pipeline.add_loras([LoraSpec(run_dir / "export")])  # loads whole
    for key, value in checkpoint["state_dict"].items():  # the export is the checkpoint's adapter
        assert torch.isfinite(value).all(), key


def test_class_images_command_draws_with_the_base(base, tmp_path):
    out = tmp_path / "class"
    args = [str(base), "--prompt", "a shape", "--n", "3", "--steps", "2", "--out", str(out)]
    assert class_images_main([*args, "--shard-size", "2"]) == 0
    stream = build_pipeline(
        sorted(map(str, out.glob("class-*.tar"))), LoaderConfig(batch_size=3), train=False
    )
    batch = next(iter(stream))
    assert prior_flags(batch) == [True] * 3 and batch["caption"] == ["a shape"] * 3
    assert len(list(out.glob("class-*.tar"))) == 2

"""Stage unet: every loss option trains, the loss goes down, pixel space works, the sizes follow the
upstream parts, the errors are one line, and the presets build (sd15: SD 1.5's parameter count)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from hydra.utils import instantiate

from ldm_train.config import compose_config
from ldm_train.data.datamodule import WebDataModule
from ldm_train.diffusion.ema import warmup_decay
from ldm_train.diffusion.loss import diffusion_loss, min_snr_weights
from ldm_train.diffusion.sampler import SamplingOptions
from ldm_train.diffusion.schedule import build_noise_scheduler
from ldm_train.errors import UserError
from ldm_train.train import build, train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def user_error(spec) -> str:
    """The one-line UserError that building `spec` raises (as train() builds a stage)."""
    with pytest.raises(UserError) as caught:
        build(spec)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def fixed_batch(tiny_shards) -> dict:
    cfg = compose_config(
        [
            f"data.train_urls='{tiny_shards['train_urls']}'",
            f"data.val_urls='{tiny_shards['val_urls']}'",
            "data.make_dataset=null",
            "data.num_workers=0",
            "data.batch_size=8",
        ]
    )
    datamodule = WebDataModule.from_config(cfg.data)
    return next(iter(datamodule.val_dataloader()))


EPSILON = "stage.module.noise_scheduler.prediction_type=epsilon"
OPTIONS = {  # the tiny preset trains v_prediction with min-SNR weighting
    "epsilon": [EPSILON, "stage.module.loss.snr_gamma=null"],
    "v_prediction": ["stage.module.loss.snr_gamma=null"],
    "min_snr": [EPSILON, "stage.module.loss.snr_gamma=5.0"],
    "offset_noise": ["stage.module.loss.offset_noise=0.1"],
    "zero_terminal_snr": [
        "stage.module.noise_scheduler.rescale_betas_zero_snr=true",
        "stage.module.noise_scheduler.prediction_type=v_prediction",
        "stage.module.loss.snr_gamma=5.0",
    ],
}


@pytest.mark.parametrize("option", OPTIONS)
def test_one_training_step_per_option(option, unet_cfg, fixed_batch):
    module = instantiate(unet_cfg(*OPTIONS[option]).stage.module)
    assert module.latents.shape == (4, 8, 8)  # the tiny VAE's latents, not the images
    assert module.net.config.cross_attention_dim == 32  # the tiny text encoder's width
    loss = module.training_step(fixed_batch, batch_idx=0)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in module.net.parameters() if p.requires_grad)
    # Frozen upstream parts: eval mode, no gradients, not part of the trained (or saved) weights.
    frozen_parts = (
        module.latents.vae(module.device),
        module.conditioning.text_encoder(module.device),
    )
    for frozen in frozen_parts:
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert not any(k.startswith(("vae", "text_encoder", "_")) for k in module.state_dict())
    # Same seed and step: the same t, noise and dropout, so the same loss.
    assert torch.equal(module.training_step(fixed_batch, batch_idx=0), loss)
    assert not torch.equal(module.training_step(fixed_batch, batch_idx=1), loss)


def test_caches_give_the_same_step(unet_cfg, fixed_batch):
    caches = ["stage.module.conditioning.cache_size=100", "stage.module.latents.cache_size=100"]
    plain, cached = (build(unet_cfg(*extra).stage.module) for extra in ([], caches))
    cached.net.load_state_dict(plain.net.state_dict())
    for batch_idx in (0, 1):  # the second step reads what the first kept
        expected = plain.training_step(fixed_batch, batch_idx)
        assert torch.allclose(cached.training_step(fixed_batch, batch_idx), expected, atol=1e-6)
    assert set(cached.conditioning.cache.items) <= set(fixed_batch["caption"]) | {""}  # "": dropped
    assert len(cached.latents.cache.items) == len(fixed_batch["key"])


def test_loss_goes_down_on_a_fixed_batch(unet_cfg, fixed_batch):
    module = instantiate(unet_cfg("model.warmup_steps=0").stage.module)
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(30):  # no trainer: global_step stays 0, so t and noise stay fixed too
        loss = module.training_step(fixed_batch, batch_idx=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_train_logs_samples_keeps_ema_in_checkpoints_and_exports(unet_cfg):
    cfg = unet_cfg("trainer.log_every_n_steps=1", "checkpoint_every_n_steps=4")
    metrics, objects = train(cfg)
    run_dir = objects["run_dir"]
    assert torch.isfinite(torch.tensor(metrics["train/mse"]))
    assert {"val/mse", "val/mse_t0100", "val/mse_t0900"} <= set(metrics)
    assert list((run_dir / "images").glob("samples_step*.png"))  # the grid, CSV logger: a PNG
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    ema, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert set(ema) == set(current) and all(k.startswith("net.") for k in ema)
    assert any(not torch.equal(ema[k], current[k]) for k in ema)  # the average lags the weights
    export = objects["export_dir"]
    assert {p.name for p in export.iterdir()} >= {"unet", "vae", "text_encoder", "scheduler"}
    exported = safetensors.torch.load_file(export / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(exported["conv_in.weight"], ema["net.conv_in.weight"])  # EMA weights


def test_pixel_space_trains_and_samples(unet_cfg):
    cfg = unet_cfg(
        "stage.vae=null", "stage.text_encoder=null", "model.net.block_out_channels=[32,32]"
    )
    _, objects = train(cfg)
    module = objects["module"]
    assert module.latents.shape == (3, 32, 32) and module.latents.vae(module.device) is None
    images = module.pipeline().generate([""], 2, SamplingOptions(steps=4))
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert list((objects["run_dir"] / "images").glob("samples_step*.png"))


def test_missing_upstream_names_the_path_and_the_command(make_cfg):
    cfg = make_cfg("stage=unet")
    message = user_error(cfg.stage.module)
    assert f"no VAE at {cfg.stage.vae}" in message and "python -m ldm_train stage=vae" in message
    cfg = make_cfg("stage=unet", "stage.vae=null")
    message = user_error(cfg.stage.module)
    assert f"no CLIP export at {cfg.stage.text_encoder}" in message
    assert "python -m ldm_train stage=clip" in message


def test_latent_channel_mismatch_is_a_one_line_error(unet_cfg):
    cfg = unet_cfg("model.net.in_channels=8")
    message = user_error(cfg.stage.module)
    assert "in_channels=8 does not match the VAE's latent channels (4)" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "noise_scheduler.prediction_type=x0",
            "prediction_type='x0' is not valid; choose one of: epsilon, v_",
        ),
        (
            "noise_scheduler.beta_schedule=cosine",
            "beta_schedule='cosine' is not valid; choose one of: linear",
        ),
        (
            "validation.sampling.sampler=lms",
            "sampler='lms' is not valid; choose one of: ddim, euler, dpmpp, heun",
        ),
        (  # heun samples flow models only
            "validation.sampling.sampler=heun",
            "sampler=heun does not sample an epsilon or v_prediction model; it takes ddim | euler",
        ),
        (
            "loss.weighting=cosmap",
            "weighting=cosmap weights the flow objective (model.prediction_type=flow)",
        ),
        ("conditioning.caption_dropout=1.5", "caption_dropout=1.5; need 0 <= p <= 1"),
    ],
)
def test_bad_options_are_one_line_errors(unet_cfg, override, expected):
    cfg = unet_cfg(f"stage.module.{override}")
    assert expected in user_error(cfg.stage.module)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_regresses_the_documented_target(prediction_type):
    scheduler = build_noise_scheduler(prediction_type=prediction_type)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    seen = {}

    def predict(x, timesteps):
        seen["x_t"] = x
        return torch.zeros_like(x)

    loss = diffusion_loss(predict, scheduler, x0, t, noise)["mse"]
    assert torch.allclose(seen["x_t"], x_t, atol=1e-5)
    assert torch.allclose(loss, target.pow(2).mean(), atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(prediction_type):
    scheduler = build_noise_scheduler(prediction_type=prediction_type)
    t = torch.tensor([0, 10, 500, 999])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    expected = torch.clamp(snr, max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    assert torch.allclose(compute_snr(scheduler, t), snr.float())
    assert torch.allclose(min_snr_weights(scheduler, t, 5.0), expected.float())
    zero_snr = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type)
    assert torch.isfinite(min_snr_weights(zero_snr, torch.tensor([999]), 5.0)).all()


def test_ema_decay_warms_up_to_its_cap():
    assert warmup_decay(0, 0.999) == pytest.approx(0.1)
    assert warmup_decay(90, 0.999) == pytest.approx(0.91)
    assert warmup_decay(10**6, 0.999) == 0.999


@pytest.mark.parametrize(
    ("preset", "parameters"), [("sd15", 859_520_964), ("small", None), ("tiny", None)]
)
def test_presets_build_and_sd15_has_sd15s_size(preset, parameters):
    cfg = compose_config(["stage=unet", f"model=unet/{preset}"])
    with torch.device("meta"):  # no memory, no init time
        net = instantiate(cfg.model.net)(
            in_channels=4, out_channels=4, cross_attention_dim=768, sample_size=64
        )
    count = sum(p.numel() for p in net.parameters())
    assert count == parameters if parameters else count > 1_000_000

"""Stage vae: presets, every loss term, the discriminator's schedule and resume, export, image grids."""

from __future__ import annotations

from functools import partial
from itertools import islice
from unittest.mock import MagicMock

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from ldm_train.callbacks.images import image_grid, log_image
from ldm_train.config import compose_config
from ldm_train.data.datamodule import WebDataModule
from ldm_train.data.stream import LoaderConfig
from ldm_train.errors import UserError
from ldm_train.export import export_checkpoint
from ldm_train.losses.autoencoder import AutoencoderLoss, adaptive_weight, hinge_d_loss
from ldm_train.nets.discriminator import NLayerDiscriminator
from ldm_train.nets.lpips import LPIPS
from ldm_train.stages.vae import VaeStage
from ldm_train.train import train

# A smaller autoencoder than the tiny preset for the runs below: wiring, not quality, is tested.
SMALL_NET = ["model.net.block_out_channels=[8,16,16]"]
SMALL_DISC = [
    "stage.module.loss.disc_weight=0.5",
    "stage.module.loss.discriminator.channels=8",
    "stage.module.loss.discriminator.n_layers=2",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU OpenMP's waiting makes two
    threads many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_autoencoder(**options) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
        **options,
    )


def posterior(mean: float, logvar: float, shape=(2, 4, 2, 2)) -> DiagonalGaussianDistribution:
    return DiagonalGaussianDistribution(
        torch.cat([torch.full(shape, mean), torch.full(shape, logvar)], dim=1)
    )


@pytest.mark.parametrize("use_quant_conv", [True, False])
def test_posterior_logvar_init(use_quant_conv):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    net = tiny_autoencoder(use_quant_conv=use_quant_conv)
    assert net.encode(images).latent_dist.logvar.mean().abs() < 1  # diffusers' init: std ~1
    VaeStage(net, AutoencoderLoss(), torch.optim.AdamW, posterior_logvar_init=-6.0)
    assert net.encode(images).latent_dist.logvar.mean().item() == pytest.approx(-6, abs=1)


def test_sd_preset_has_the_published_size():
    cfg = compose_config(["stage=vae", "model=vae/sd", "data.image_size=256"])
    with torch.device("meta"):  # no memory, no init time
        net = instantiate(cfg.model.net)
    assert sum(p.numel() for p in net.parameters()) == 83_653_863
    assert len(net.config.block_out_channels) == 4 and net.config.latent_channels == 4


def test_tiny_preset_latents_are_4x8x8_at_32px():
    cfg = compose_config(["stage=vae"])
    net = instantiate(cfg.model.net)
    latents = net.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert latents.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("kind, expected", [("l1", 0.5), ("l2", 0.25)])
def test_reconstruction_term_sums_pixels_and_averages_images(kind, expected):
    loss = AutoencoderLoss(reconstruction=kind)
    images = torch.zeros(2, 3, 4, 4)
    assert loss.reconstruction_term(images + 0.5, images).item() == pytest.approx(expected * 48)


def test_kl_term_is_weighted_and_zero_for_the_prior():
    loss = AutoencoderLoss(kl_weight=1e-3)
    images = torch.zeros(2, 3, 4, 4)
    terms, _ = loss.generator_terms(images, images, posterior(0.0, 0.0), step=0)
    assert set(terms) == {"rec", "kl"} and terms["kl"].item() == 0.0
    terms, _ = loss.generator_terms(images, images, posterior(1.0, 0.0), step=0)
    assert terms["kl"].item() == pytest.approx(1e-3 * 0.5 * 16)  # 16 latent elements per image


def test_lpips_with_random_weights_gives_gradients():
    lpips = LPIPS(pretrained=False)
    lpips.train()  # a training parent must not switch it to train mode
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstruction = (images + 0.3 * torch.randn_like(images)).requires_grad_()
    distance = lpips(images, reconstruction)
    assert distance.shape == (2, 1, 1, 1) and (distance > 0).all()
    assert lpips(images, images).abs().max() == 0
    distance.sum().backward()
    assert torch.isfinite(reconstruction.grad).all() and reconstruction.grad.abs().sum() > 0
    reconstruction.grad = None

    loss = AutoencoderLoss(
        perceptual_weight=1.0, perceptual=partial(LPIPS, pretrained=False), kl_weight=0.0
    )
    terms, _ = loss.generator_terms(images, reconstruction, posterior(0.0, 0.0), step=0)
    expected = loss.perceptual(images, reconstruction).mean() * 3 * 32 * 32
    assert terms["perceptual"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["perceptual"].backward()
    assert reconstruction.grad.abs().sum() > 0


def test_lpips_loads_the_upstream_weight_files(tmp_path):
    source = LPIPS(pretrained=False)
    torch.nn.init.uniform_(source.heads[0][1].weight)
    vgg = {f"features.{k}": v for k, v in source.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's file has more than the features
    heads = {f"lin{i}.model.1.weight": head[1].weight for i, head in enumerate(source.heads)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    loaded = LPIPS(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(images, -images), source(images, -images))
    # Without heads_weights: the LPIPS heads torchmetrics ships (non-negative, as trained).
    shipped = LPIPS(tmp_path / "vgg16.pth")
    assert not torch.equal(shipped.heads[0][1].weight, source.heads[0][1].weight)
    assert all((head[1].weight >= 0).all() for head in shipped.heads)

    with pytest.raises(UserError, match="stage.module.loss.perceptual.vgg_weights"):
        LPIPS()
    with pytest.raises(UserError, match=str(tmp_path / "missing.pth")):
        LPIPS(tmp_path / "missing.pth", tmp_path / "vgg.pth")
    with pytest.raises(UserError, match="do not fit"):
        LPIPS(tmp_path / "vgg.pth", tmp_path / "vgg.pth")


def test_hinge_loss_and_adaptive_weight():
    assert hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0
    assert hinge_d_loss(torch.zeros(3), torch.zeros(3)).item() == 1.0
    assert hinge_d_loss(torch.tensor([0.5]), torch.tensor([1.0])).item() == pytest.approx(1.25)

    layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    nll, gan = (3 * layer).sum(), (0.5 * layer).sum()  # gradients 3 and 0.5 per element
    assert adaptive_weight(nll, gan, layer).item() == pytest.approx(6.0, rel=1e-3)


def test_gan_term_uses_the_adaptive_weight_and_starts_at_disc_start():
    net = tiny_autoencoder()
    loss = AutoencoderLoss(
        disc_weight=0.5, disc_start=3, discriminator=partial(NLayerDiscriminator, 3, 8, 2)
    )
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    dist = net.encode(images).latent_dist
    reconstruction = net.decode(dist.sample()).sample
    last_layer = net.decoder.conv_out.weight
    assert [loss.discriminator_active(step) for step in range(5)] == [False] * 3 + [True] * 2
    before, _ = loss.generator_terms(images, reconstruction, dist, step=2, last_layer=last_layer)
    assert "gan" not in before
    terms, extras = loss.generator_terms(
        images, reconstruction, dist, step=3, last_layer=last_layer
    )
    gan = -loss.discriminator(reconstruction).mean()
    expected = adaptive_weight(terms["rec"], gan, last_layer) * 0.5
    assert extras["gan_weight"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["gan"].item() == pytest.approx((expected * gan).item(), rel=1e-5)
    disc, logits = loss.discriminator_terms(images, reconstruction)
    assert disc["disc"].item() >= 0 and set(logits) == {"logits_real", "logits_fake"}
    disc["disc"].backward()  # the discriminator's loss never reaches the autoencoder
    assert last_layer.grad is None and loss.discriminator.main[0].weight.grad is not None


def test_loss_goes_down_on_a_fixed_batch(tiny_shards):
    loader = LoaderConfig(image_size=32, batch_size=8, num_workers=0)
    data = WebDataModule(tiny_shards["train_urls"], tiny_shards["val_urls"], loader)
    images = next(iter(data.val_dataloader()))["image"]
    net, loss = tiny_autoencoder(), AutoencoderLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        dist = net.encode(images).latent_dist
        terms, _ = loss.generator_terms(images, net.decode(dist.sample()).sample, dist, step)
        total = sum(terms.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


def test_bad_options_are_clear_errors(make_cfg):
    with pytest.raises(UserError, match="reconstruction='l3' is not valid; choose one of: l1, l2"):
        AutoencoderLoss(reconstruction="l3")
    with pytest.raises(UserError, match="kl_weight=-1 must be >= 0"):
        AutoencoderLoss(kl_weight=-1)
    with pytest.raises(UserError, match="discriminator is null"):
        AutoencoderLoss(disc_weight=0.5)
    with pytest.raises(UserError, match="perceptual is null"):
        AutoencoderLoss(perceptual_weight=1.0)
    gan = AutoencoderLoss(disc_weight=0.5, discriminator=NLayerDiscriminator)
    with pytest.raises(UserError, match="stage.module.disc_optimizer is null"):
        VaeStage(tiny_autoencoder(), gan, optimizer=torch.optim.AdamW)
    # From the config, through train(): the same one-line errors.
    with pytest.raises(UserError, match="reconstruction='l3' is not valid"):
        train(make_cfg("stage=vae", "stage.module.loss.reconstruction=l3"))
    with pytest.raises(UserError, match="perceptual.vgg_weights"):
        train(make_cfg("stage=vae", "stage.module.loss.perceptual_weight=1.0"))


def test_gan_run_trains_both_optimizers_and_resumes(make_cfg):
    # The discriminator starts at step 1: run 1 (2 steps) steps it once, run 2 resumes to step 4.
    common = [
        *SMALL_NET,
        *SMALL_DISC,
        "stage.module.loss.disc_start=1",
        "checkpoint_every_n_steps=2",
    ]
    _, first = train(make_cfg("stage=vae", "trainer.max_steps=2", *common))
    assert first["trainer"].global_step == 2  # training steps, not optimizer steps
    checkpoints = first["run_dir"] / "checkpoints"
    one = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert optimizer_steps(one) == [2, 1]

    metrics, second = train(
        make_cfg("stage=vae", "trainer.max_steps=4", "trainer.log_every_n_steps=1", *common)
    )
    assert second["trainer"].global_step == 4
    two = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert two["global_step"] == 4
    assert optimizer_steps(two) == [4, 3]  # both optimizer states restored and continued
    assert [s["last_epoch"] for s in two["lr_schedulers"]] == [4, 3]
    for prefix in ("net.", "loss.discriminator."):  # both networks trained after the resume
        changed = [
            k
            for k in one["state_dict"]
            if k.startswith(prefix) and k.endswith("weight")
            if not torch.equal(one["state_dict"][k], two["state_dict"][k])
        ]
        assert changed, prefix
    for name in ("train/loss", "train/rec", "train/kl", "train/gan", "train/disc"):
        assert torch.isfinite(torch.tensor(metrics[name])), name


def optimizer_steps(checkpoint: dict) -> list[int]:
    return [int(state["state"][0]["step"]) for state in checkpoint["optimizer_states"]]


def test_export_round_trip_measured_scale_and_image_grid(make_cfg):
    cfg = make_cfg("stage=vae", *SMALL_NET, "trainer.val_check_interval=2")
    metrics, objects = train(cfg)
    module, run_dir = objects["module"], objects["run_dir"]
    for name in ("val/rec", "val/psnr", "val/ssim", "val/latent_scale"):
        assert name in metrics, name

    # The scale is 1 / std of the seeded posterior samples over the validation's 2 batches.
    module.eval()
    generator = torch.Generator().manual_seed(VaeStage.LATENT_SEED)
    with torch.no_grad():
        latents = torch.cat(
            [
                module.net.encode(batch["image"]).latent_dist.sample(generator=generator)
                for batch in islice(objects["datamodule"].val_dataloader(), 2)
            ]
        )
    scale = 1 / latents.double().std(unbiased=False).item()
    assert module.latent_scale.item() == pytest.approx(scale, rel=1e-5)
    assert metrics["val/latent_scale"] == pytest.approx(scale, rel=1e-5)

    exported = objects["export_dir"]  # train() exports after fit
    assert exported == run_dir / "export"
    assert (exported / "config.json").is_file()
    assert (exported / "diffusion_pytorch_model.safetensors").is_file()
    loaded = AutoencoderKL.from_pretrained(exported).eval()
    assert loaded.config.scaling_factor == pytest.approx(scale, rel=1e-5)
    assert loaded.config.scaling_factor != pytest.approx(0.18215, rel=1e-3)
    images = next(iter(objects["datamodule"].val_dataloader()))["image"]
    with torch.no_grad():
        assert torch.equal(
            loaded(images, sample_posterior=False).sample,
            module.net(images, sample_posterior=False).sample,
        )

    # `python -m ldm_train.export` rebuilds the stage from last.ckpt, whose buffer carries the scale
    # (written at the end of the run here, after the last validation).
    from_checkpoint = AutoencoderKL.from_pretrained(export_checkpoint(run_dir, run_dir / "again"))
    assert from_checkpoint.config.scaling_factor == pytest.approx(scale, rel=1e-5)

    # CSV logger: the grid of inputs above reconstructions is a PNG per validation.
    for step in (2, 4):
        grid = Image.open(run_dir / "images" / f"vae_step{step:06d}.png")
        assert grid.size == (8 * 34 + 2, 2 * 34 + 2)  # 8 columns, 2 rows of 32 px + padding


@pytest.mark.parametrize("validation", ["at_the_end", "off"])
def test_a_run_shorter_than_a_validation_interval_exports_a_measured_scale(make_cfg, validation):
    """val_every_n_steps=100 and 2 steps: the final validation measures the latent scale; with
    validation off the stage measures it after fit on SCALE_BATCHES batches of the val shards."""
    off = ["trainer.limit_val_batches=0"] if validation == "off" else []
    cfg = make_cfg("stage=vae", *SMALL_NET, "val_every_n_steps=100", "logger=none", *off)
    metrics, objects = train(cfg)
    module = objects["module"].eval()
    batches = islice(objects["datamodule"].plain_batches(), VaeStage.SCALE_BATCHES)
    if validation == "at_the_end":
        batches = islice(objects["datamodule"].val_dataloader(), 2)  # limit_val_batches=2
        assert metrics["val/latent_scale"] == pytest.approx(module.latent_scale.item())
    generator = torch.Generator().manual_seed(VaeStage.LATENT_SEED)
    with torch.no_grad():
        latents = torch.cat(
            [module.net.encode(b["image"]).latent_dist.sample(generator=generator) for b in batches]
        )
    scale = 1 / latents.double().std(unbiased=False).item()
    exported = AutoencoderKL.from_pretrained(objects["export_dir"]).config.scaling_factor
    assert exported == pytest.approx(scale, rel=1e-5) and exported != 1.0


def test_image_grid_goes_to_wandb_tensorboard_or_a_png(tmp_path):
    rows = [torch.zeros(4, 3, 8, 8) - 1, torch.ones(4, 3, 8, 8)]
    grid = image_grid(rows, max_columns=3)
    assert grid.shape == (3, 2 * 10 + 2, 3 * 10 + 2)
    assert grid[:, 2:10, 2:10].max() == 0 and grid[:, 12:20, 2:10].min() == 1

    wandb, tensorboard = MagicMock(spec=WandbLogger), MagicMock(spec=TensorBoardLogger)
    trainer = MagicMock(is_global_zero=True, sanity_checking=False, global_step=7)
    trainer.default_root_dir = str(tmp_path)
    trainer.loggers = [wandb, tensorboard]
    assert log_image(trainer, "vae", grid) == ["wandb", "tensorboard"]
    wandb.log_image.assert_called_once_with(key="images/vae", images=[grid], step=7)
    tensorboard.experiment.add_image.assert_called_once_with("images/vae", grid, global_step=7)
    trainer.loggers = []
    assert log_image(trainer, "vae", grid) == [str(tmp_path / "images" / "vae_step000007.png")]
    trainer.is_global_zero = False
    assert log_image(trainer, "other", grid) == []

"""The denoiser choice (ldm_train.diffusion.denoiser): the transformer presets build at their sizes
(SD3 Medium's on the meta device), their null sizes follow the upstream parts, mismatches and
switches the transformer lacks are one-line errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from hydra.utils import instantiate

from ldm_train.config import compose_config
from ldm_train.diffusion.denoiser import Sizes, build_denoiser, training_flops
from ldm_train.errors import UserError
from ldm_train.perf import Perf

DEMO = Sizes(channels=4, context_width=64, latent_side=8, max_latent_side=8)


def preset(name: str, *overrides: str):
    return instantiate(compose_config(["stage=unet", f"model=unet/{name}", *overrides]).model.net)


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_dit_tiny_matches_the_demo_unets_parameter_count():
    dit = build_denoiser(preset("dit_tiny"), DEMO)
    unet = build_denoiser(preset("demo"), DEMO)
    assert isinstance(dit, SD3Transformer2DModel) and isinstance(unet, UNet2DConditionModel)
    assert dit.config.joint_attention_dim == dit.config.pooled_projection_dim == 64
    assert dit.config.caption_projection_dim == 64  # 2 heads x 32
    assert dit.config.patch_size == 1 and dit.config.qk_norm == "rms_norm"
    assert dit.config.pos_embed_max_size == 16  # twice 8 / 1 patches
    assert abs(count(dit) / count(unet) - 1) < 0.05  # 1.03M vs 1.08M


@pytest.mark.parametrize(
    ("name", "timesteps"),
    [("dit_tiny", "uniform"), ("dit_small", "logit_normal"), ("dit_sd3_medium", "logit_normal")],
)
def test_each_transformer_preset_draws_its_own_timesteps(name, timesteps):
    # dit_tiny's uniform timesteps are for the 32 px shapes; the presets for real images inherit
    # its net but keep SD3's logit-normal timesteps.
    cfg = compose_config(["stage=unet", f"model=unet/{name}"])
    assert cfg.stage.module.loss.timesteps == timesteps


def test_the_sd3_medium_preset_is_sd3_mediums_size():
    """Built on the meta device (no memory) with SD3's own text widths: the 2B of SD3 Medium."""
    with torch.device("meta"):
        net = preset(
            "dit_sd3_medium", "model.net.joint_attention_dim=4096", "model.net.in_channels=16"
        )(out_channels=16, pooled_projection_dim=2048, caption_projection_dim=1536)
    assert 2.0e9 < count(net) < 2.1e9
    assert net.config.num_layers == 24 and net.config.pos_embed_max_size == 192


def test_buckets_get_positions_and_the_flops_are_counted():
    sizes = Sizes(channels=4, context_width=32, latent_side=8, max_latent_side=12)
    net = build_denoiser(preset("dit_tiny", "model.net.num_layers=1"), sizes)
    assert net.config.pos_embed_max_size == 24  # twice 12 / 1 patches
    out = net(
        hidden_states=torch.randn(2, 4, 12, 8),
        timestep=torch.tensor([10.0, 900.0]),
        encoder_hidden_states=torch.randn(2, 5, 32),
        pooled_projections=torch.randn(2, 32),
    ).sample
    assert out.shape == (2, 4, 12, 8)
    assert training_flops(net, (2, 4, 8, 8), (2, 5, 32)) > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.net.caption_projection_dim=32", "caption_projection_dim=32 must equal"),
        ("model.net.pos_embed_max_size=2", "pos_embed_max_size=2 patches of 1 cover latents up"),
        ("model.net.pooled_projection_dim=16", "pooled_projection_dim=16: the pooled text vector"),
        ("model.net.joint_attention_dim=16", "joint_attention_dim=16 does not match the text"),
        ("model.net.in_channels=3", "in_channels=3 does not match the VAE's latent channels"),
    ],
)
def test_transformer_mismatches_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message):
        build_denoiser(preset("dit_tiny", "model.net.num_layers=1", override), DEMO)


def test_eager_attention_is_refused_for_joint_attention():
    net = build_denoiser(preset("dit_tiny", "model.net.num_layers=1"), DEMO)
    Perf(attention="sdpa").apply(net)  # keeps its JointAttnProcessor2_0
    assert {type(p).__name__ for p in net.attn_processors.values()} == {"JointAttnProcessor2_0"}
    with pytest.raises(UserError, match="perf.attention=eager: SD3Transformer2DModel"):
        Perf(attention="eager").apply(net)


def test_stage_denoiser_is_another_name_for_stage_unet():
    """The honest name when the network is a transformer; the same config, runs and exports."""
    from omegaconf import OmegaConf

    alias = compose_config(["stage=denoiser", "model=denoiser/dit_tiny"])
    same = compose_config(["stage=unet", "model=unet/dit_tiny"])
    assert OmegaConf.to_yaml(alias) == OmegaConf.to_yaml(same)
    assert alias.paths.run_dir == "outputs/shapes/unet"

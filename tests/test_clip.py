"""Stage clip: loss, optimizer groups, metrics, presets, export through open_clip, text encoder, DDP."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import lightning as L
import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hydra.utils import instantiate

from ldm_train.config import compose_config
from ldm_train.data.shapes import COLOURS, SHAPES, caption, render, sample_attributes
from ldm_train.data.stream import LoaderConfig, image_transform
from ldm_train.diffusion.text_encoder import ClipTextEncoder
from ldm_train.errors import UserError
from ldm_train.export import export_checkpoint
from ldm_train.losses.contrastive import contrastive_terms
from ldm_train.metrics.zero_shot import ZeroShotTask, parse_zero_shot, retrieval_recall
from ldm_train.stages.clip import ClipStage, build_clip, weight_decay_groups
from ldm_train.train import train

# A CLIP small enough for multiprocess and many-step tests; the tiny preset runs the rest.
MICRO = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
)


def shapes_batch(n: int, seed: int = 0) -> dict:
    """n samples of the embedded dataset, made in memory, as the loader batches them."""
    rng = random.Random(seed)
    attrs = [sample_attributes(rng) for _ in range(n)]
    to_tensor = image_transform(LoaderConfig(image_size=32, random_flip=False), train=False)
    return {
        "image": torch.stack([to_tensor(render(a, 32)) for a in attrs]),
        "caption": [caption(a) for a in attrs],
        "meta": attrs,
    }


def micro_stage(**kwargs) -> ClipStage:
    return ClipStage(
        build_clip(**MICRO),
        open_clip.tokenizer.SimpleTokenizer(context_length=16),
        optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.1),
        **kwargs,
    )


@pytest.fixture
def tiny_stage(make_cfg) -> ClipStage:
    torch.manual_seed(0)
    return instantiate(make_cfg("stage=clip").stage.module)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_loss_goes_down_on_a_fixed_batch():
    torch.manual_seed(0)
    stage = micro_stage()
    batch = shapes_batch(16)
    optimizer = stage.configure_optimizers()  # the stage's groups, no schedule
    losses = []
    for _ in range(40):
        loss = stage.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stage.on_train_batch_end(None, batch, 0)
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def exempt_and_decayed(stage: ClipStage) -> tuple[set[str], set[str]]:
    optimizer = stage.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in stage.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert len(decayed) + len(exempt) == len(names)
    return exempt, decayed


def test_weight_decay_groups_follow_open_clip(tiny_stage):
    exempt, decayed = exempt_and_decayed(micro_stage())  # a ViT image tower
    for name in [
        "net.logit_scale",
        "net.token_embedding.weight",
        "net.positional_embedding",
        "net.visual.class_embedding",
        "net.visual.positional_embedding",
        "net.ln_final.weight",
        "net.visual.ln_post.bias",
        "net.transformer.resblocks.0.attn.in_proj_bias",
    ]:
        assert name in exempt, name
    for name in [
        "net.text_projection",
        "net.visual.proj",
        "net.visual.conv1.weight",
        "net.transformer.resblocks.0.attn.in_proj_weight",
        "net.visual.transformer.resblocks.0.mlp.c_fc.weight",
    ]:
        assert name in decayed, name
    exempt, decayed = exempt_and_decayed(tiny_stage)  # the preset's ResNet image tower
    assert {"net.visual.bn1.weight", "net.visual.attnpool.positional_embedding"} <= exempt
    assert {"net.visual.conv1.weight", "net.visual.attnpool.q_proj.weight"} <= decayed
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert weight_decay_groups(frozen.named_parameters())[0]["params"] == []


def test_logit_scale_is_clamped_at_100(tiny_stage):
    with torch.no_grad():
        tiny_stage.net.logit_scale.fill_(10.0)
    tiny_stage.on_train_batch_end(None, None, 0)
    assert tiny_stage.net.logit_scale.exp().item() == pytest.approx(100.0)


def test_retrieval_recall_on_constructed_features():
    images = torch.eye(10)
    perfect = retrieval_recall(images, images, chunk_size=3)
    assert all(value.item() == 1.0 for value in perfect.values()), perfect
    # Pairs (0, 1) and (2, 3) each see their partner's text as closer than their own: those four
    # rank their true match second, in both directions.
    texts = images.clone()
    for a, b in [(0, 1), (2, 3)]:
        texts[a], texts[b] = 0.6 * images[a] + 0.8 * images[b], 0.6 * images[b] + 0.8 * images[a]
    metrics = retrieval_recall(images, texts, chunk_size=4)
    assert metrics["i2t_r1"].item() == pytest.approx(0.6)
    assert metrics["t2i_r1"].item() == pytest.approx(0.6)
    assert metrics["i2t_r5"].item() == metrics["t2i_r5"].item() == 1.0


class WordEmbedder:
    """Tokenizer + text tower of a CLIP that knows its words: one axis per shape and colour."""

    words = list(SHAPES) + list(COLOURS)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.embed(t) for t in texts])

    def embed(self, text: str) -> torch.Tensor:
        vector = torch.zeros(len(self.words))
        for word in text.split():
            if word in self.words:
                vector[self.words.index(word)] = 1.0
        return vector


def test_zero_shot_and_retrieval_metrics_of_a_perfect_model():
    stage = micro_stage(zero_shot=compose_config([]).data.zero_shot)
    embedder = WordEmbedder()
    stage.tokenizer = embedder  # classifier prompts -> word axes
    stage.net.encode_text = lambda tokens, normalize=False: F.normalize(tokens, dim=-1)
    wrong_shape = {1, 5}  # in each batch of 12 these "see" the wrong shape: accuracy 20/24

    def features(images, captions):
        vectors = []
        for index, text in enumerate(captions):
            colour, shape = text.split()[2:4]  # "a small red circle ..." -> red, circle
            if index in wrong_shape:
                shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
            vectors.append(embedder.embed(f"{shape} {colour}") + 0.01 * torch.randn(12))
        image = F.normalize(torch.stack(vectors), dim=-1)
        return {"image_features": image, "text_features": image, "logit_scale": torch.tensor(10.0)}

    stage.forward = features
    batches = [shapes_batch(12, seed=1), shapes_batch(12, seed=2)]
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    (metrics,) = trainer.validate(stage, dataloaders=loader, verbose=False)
    assert metrics["val/zeroshot_shape_acc"] == pytest.approx(20 / 24)
    assert metrics["val/zeroshot_colour_acc"] == pytest.approx(1.0)
    assert metrics["val/i2t_r1"] == metrics["val/t2i_r1"] == 1.0  # images = texts: perfect
    task = ZeroShotTask("shape", ("circle", "square"), ("a {}",))
    assert task.labels([{"shape": "square"}, {"shape": "cross"}, {}]).tolist() == [1, -1, -1]


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="stage.module.loss='softmax' is not valid.*clip, siglip"):
        micro_stage(loss="softmax")
    with pytest.raises(UserError, match="exactly one '{}'"):
        parse_zero_shot({"shape": {"label_key": "shape", "classes": ["a"], "templates": ["x"]}})
    with pytest.raises(UserError, match="did you mean ViT-B-32"):
        build_clip(card="ViT-B32")
    with pytest.raises(UserError, match="model.net.vision_cfg.patchsize"):
        build_clip(**{**MICRO, "vision_cfg": {**MICRO["vision_cfg"], "patchsize": 4}})


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_siglip_option_trains_a_step():
    stage = micro_stage(loss="siglip")
    assert stage.net.logit_bias is not None and stage.model_cfg["init_logit_bias"] == -10.0
    optimizer = stage.configure_optimizers()
    batch = shapes_batch(8)
    loss = stage.training_step(batch, 0)
    loss.backward()
    assert stage.net.logit_bias.grad is not None
    optimizer.step()
    assert torch.isfinite(loss)


def test_vit_b_32_preset_has_open_clips_parameter_count():
    cfg = compose_config(["stage=clip", "model=clip/ViT-B-32", "data.image_size=224"])
    with torch.device("meta"):
        preset = instantiate(cfg.model.net).model
        reference = open_clip.create_model("ViT-B-32", device="meta")
    count = sum(p.numel() for p in preset.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 151_277_313
    assert preset.context_length == cfg.stage.module.tokenizer.context_length == 77


@pytest.fixture
def trained_run(make_cfg) -> dict:
    """A few steps of the default clip stage on the tiny shards, exported from its checkpoint."""
    cfg = make_cfg(
        "stage=clip",
        "trainer.max_steps=2",
        "data.batches_per_epoch=2",
        "trainer.limit_val_batches=1",
    )
    metrics, objects = train(cfg)
    export_dir = export_checkpoint(objects["run_dir"])  # python -m ldm_train.export RUN_DIR
    return {"metrics": metrics, "module": objects["module"], "export": export_dir, "cfg": cfg}


def test_training_logs_metrics_and_export_loads_back_through_open_clip(trained_run):
    metrics, module, export_dir = (
        trained_run["metrics"],
        trained_run["module"],
        trained_run["export"],
    )
    for key in ["val/i2t_r1", "val/i2t_r5", "val/t2i_r1", "val/t2i_r5"] + [
        f"val/zeroshot_{task}_acc" for task in trained_run["cfg"].data.zero_shot
    ]:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= {
        p.name for p in export_dir.iterdir()
    }
    module.eval()
    images = [render(sample_attributes(random.Random(i)), 32) for i in range(4)]
    loader_view = image_transform(LoaderConfig(image_size=32, random_flip=False), train=False)
    with torch.no_grad():
        expected = module.net.encode_image(
            module.normalize(torch.stack(list(map(loader_view, images))))
        )

    # By name: the model card + the weights file, as the issue asks.
    open_clip.add_model_config(export_dir / f"{module.export_name}.json")
    by_name, _, preprocess = open_clip.create_model_and_transforms(
        module.export_name, pretrained=str(export_dir / "open_clip_model.safetensors")
    )
    # The whole folder, normalisation from its preprocess_cfg: open_clip's local-dir loading.
    by_folder, _, folder_preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{export_dir}"
    )
    for model, transform in [(by_name, preprocess), (by_folder, folder_preprocess)]:
        normalize = transform.transforms[-1]
        assert torch.allclose(torch.tensor(normalize.mean), module.image_mean.flatten())
        assert torch.allclose(torch.tensor(normalize.std), module.image_std.flatten())
        with torch.no_grad():
            got = model.eval().encode_image(torch.stack([transform(image) for image in images]))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_text_encoder_from_the_export(trained_run):
    module, export_dir = trained_run["module"], trained_run["export"]
    last = ClipTextEncoder.from_pretrained(export_dir)
    penultimate = ClipTextEncoder.from_pretrained(export_dir, layer="penultimate")
    captions = ["a small red circle in the center on a blue background", ""]
    hidden, pooled = last(captions)
    width, length = module.net.transformer.width, module.net.context_length
    assert last.width == width and last.embed_dim == module.net.text_projection.shape[1]
    assert hidden.shape == (2, length, width) and pooled.shape == (2, last.embed_dim)
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()  # "" works
    module.eval()
    with torch.no_grad():
        reference = module.net.encode_text(module.tokenizer(captions))
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=1e-4)
    penultimate_hidden, _ = penultimate(captions)
    assert penultimate_hidden.shape == hidden.shape
    assert not torch.allclose(penultimate_hidden, hidden)
    last.train()  # e.g. the U-Net stage's Trainer switching its module to training
    assert not last.training and not any(p.requires_grad for p in last.parameters())
    assert not hidden.requires_grad
    with pytest.raises(UserError, match="layer='middle' is not valid"):
        ClipTextEncoder.from_pretrained(export_dir, layer="middle")
    with pytest.raises(UserError, match="no open_clip_config.json"):
        ClipTextEncoder.from_pretrained(export_dir.parent)


# --- DDP: 2 CPU processes over gloo --------------------------------------------------------------

DDP_OPTIONS = [  # (loss, local_loss, gather_with_grad)
    ("clip", False, False),
    ("clip", False, True),
    ("clip", True, True),
    ("siglip", False, False),
]


def ddp_losses(stage: ClipStage, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one step on `batch` (the rank's share under DDP)."""
    stage.zero_grad()
    loss = contrastive_terms(stage.loss, **stage(batch["image"], batch["caption"]))["contrastive"]
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None
    }


def ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    batch = shapes_batch(8)
    share = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}
    results = {}
    for loss_kind, local_loss, gather_with_grad in DDP_OPTIONS:
        torch.manual_seed(0)  # the same weights on both ranks, as DDP starts them
        stage = micro_stage(
            loss=loss_kind, local_loss=local_loss, gather_with_grad=gather_with_grad
        )
        stage.configure_loss(rank, world_size)  # what setup() does with the trainer's values
        loss, grads = ddp_losses(stage, share)
        for grad in grads.values():  # DDP's gradient averaging
            dist.all_reduce(grad)
            grad /= world_size
        losses = [torch.zeros_like(loss) for _ in range(world_size)]
        dist.all_gather(losses, loss)
        results[(loss_kind, local_loss, gather_with_grad)] = (torch.stack(losses), grads)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gathered_loss_equals_one_process_on_the_whole_batch(tmp_path: Path):
    out = tmp_path / "ddp.pt"
    # Forked: the children start with this worker's imports instead of importing torch again.
    mp.start_processes(
        ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="fork"
    )
    results = torch.load(out, weights_only=False)
    batch = shapes_batch(8)
    for options, (rank_losses, ddp_grads) in results.items():
        loss_kind, local_loss, gather_with_grad = options
        torch.manual_seed(0)
        single = micro_stage(loss=loss_kind)
        loss, grads = ddp_losses(single, batch)
        if loss_kind == "clip" and not local_loss:
            # Every rank computes the loss of the whole gathered batch.
            torch.testing.assert_close(rank_losses, torch.stack([loss, loss]), msg=str(options))
        else:
            # Each rank's rows (images) against all texts: their mean is the whole-batch loss.
            torch.testing.assert_close(rank_losses.mean(), loss, msg=str(options))
        if local_loss and gather_with_grad:
            # open_clip's recommended setting: averaged gradients are the whole-batch gradients.
            for name, grad in grads.items():
                torch.testing.assert_close(ddp_grads[name], grad, atol=1e-5, rtol=1e-4)

"""Sample metrics: the Fréchet distance is ~0 for a set against itself and grows with noise, equals
torchmetrics' and the textbook formula, KID adapts to small sets, clip_score ranks matching prompts
above shuffled ones on a CLIP trained here, the zero-shot accuracy is prompt_accuracy's, 2 DDP
processes give the 1-process figures, Inception loads from a file without unpickling code, and the
evaluate command writes metrics.json for a tiny export or checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from open_clip.model import set_model_preprocess_cfg
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ldm_train.config import compose_config
from ldm_train.diffusion.sampler import per_prompt
from ldm_train.errors import UserError
from ldm_train.evaluate import main
from ldm_train.formats.clip_model import load_clip, save_clip
from ldm_train.metrics.features import ClipImageFeatures, InceptionFeatures, to_uint8
from ldm_train.metrics.prompt_accuracy import prompt_accuracy
from ldm_train.metrics.reference import choose_prompts, loader_options, read_validation
from ldm_train.metrics.sample import SampleMetrics, build_sample_metrics
from ldm_train.metrics.share import SampleFn, rank_share, sample_share
from ldm_train.metrics.zero_shot import parse_zero_shot

SHAPE_TASKS = parse_zero_shot(compose_config([]).data.zero_shot)


@pytest.fixture(scope="module")
def clip_dir(upstream) -> Path:
    return upstream["clip"]


@pytest.fixture(scope="module")
def val_set(tiny_shards):
    """The 64 validation images of the tiny shapes shards, with captions and labels."""
    return read_validation(tiny_shards["val_urls"], loader_options({}, 32), limit=1000)


def frechet_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    """The textbook formula in float64 with the symmetric square root (eigh), independent of
    torchmetrics' eigvals(S1 S2): |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)."""

    def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(matrix)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    x, y = x.double(), y.double()
    s1, s2 = torch.cov(x.T), torch.cov(y.T)
    root = psd_sqrt(s1)
    cross = psd_sqrt(root @ s2 @ root).trace()
    return float((x.mean(0) - y.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def test_validation_set_and_prompts_come_from_the_val_shards(val_set):
    assert val_set.images.shape == (64, 3, 32, 32) and val_set.images.abs().max() <= 1
    assert len(val_set.captions) == 64 and val_set.metas[0]["shape"] in SHAPE_TASKS["shape"].classes
    prompts, labels = choose_prompts(None, val_set, limit=5)  # data.prompts null: val captions
    assert prompts == val_set.captions[:5] and labels == val_set.metas[:5]
    configured = ["a red circle", {"caption": "a blue cross", "shape": "cross"}]
    assert choose_prompts(configured, val_set, limit=5) == (
        ["a red circle", "a blue cross"],
        [{}, {"shape": "cross"}],
    )
    with pytest.raises(UserError, match="caption"):
        choose_prompts([{"shape": "cross"}], None, limit=5)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise(clip_dir, val_set):
    metrics = SampleMetrics(load_clip(clip_dir), "clip")
    metrics.add_reference(val_set.images)
    metrics.freeze_reference()
    metrics.add_reference(-val_set.images)  # ignored: the reference is computed once
    generator = torch.Generator().manual_seed(0)
    distances = []
    for sigma in (0.0, 0.05, 0.2, 0.5, 1.0):
        noise = torch.randn(val_set.images.shape, generator=generator)
        metrics.update((val_set.images + sigma * noise).clamp(-1, 1))
        distances.append(float(metrics.compute()["fd_clip"]))
        metrics.reset()  # the generated side only
    assert abs(distances[0]) < 1e-4 * distances[-1]
    assert distances == sorted(distances) and distances[1] > 10 * abs(distances[0])


def test_fd_and_kid_equal_torchmetrics_on_the_same_features(clip_dir, val_set):
    clip = load_clip(clip_dir)
    real, fake = val_set.images[:40], val_set.images[40:].flip(-1)  # 40 vs 24 images
    ours = SampleMetrics(clip, "clip", kid_subset_size=1000)  # KID's subset shrinks to 24
    ours.add_reference(real)
    ours.update(fake)
    results = ours.compute()
    extractor = ClipImageFeatures(clip)
    fid = FrechetInceptionDistance(feature=extractor)
    kid = KernelInceptionDistance(feature=extractor, subsets=100, subset_size=24)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    torch.manual_seed(0)  # KID's subsets: ours draws them from seed 0
    kid_mean, kid_std = kid.compute()
    assert results["fd_clip"] == pytest.approx(float(fid.compute()), rel=1e-5)
    with torch.no_grad():
        textbook = frechet_reference(extractor(real), extractor(fake))
    assert results["fd_clip"] == pytest.approx(textbook, rel=1e-3)
    assert results["kid_clip"] == pytest.approx(float(kid_mean), rel=1e-4)
    assert results["kid_clip_std"] == pytest.approx(float(kid_std), rel=1e-4)
    assert ours.compute()["kid_clip"] == results["kid_clip"]  # the same subsets every time


def test_distances_need_two_images_a_side(clip_dir, val_set):
    metrics = SampleMetrics(load_clip(clip_dir), "clip")
    metrics.add_reference(val_set.images)
    metrics.update(val_set.images[:1])
    with pytest.raises(UserError, match="at least 2 reference and 2 generated"):
        metrics.compute()


def test_kid_of_two_whole_sets_is_one_subset(clip_dir, val_set):
    """Equal sets within the subset size: every subset is both whole sets; one is computed."""
    extractor = ClipImageFeatures(load_clip(clip_dir))
    real, fake = val_set.images[:32], val_set.images[32:].flip(-1)
    ours = SampleMetrics(load_clip(clip_dir), "clip")
    ours.add_reference(real)
    ours.update(fake)
    results = ours.compute()
    kid = KernelInceptionDistance(feature=extractor, subsets=3, subset_size=32)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    assert results["kid_clip"] == pytest.approx(float(kid.compute()[0]), rel=1e-3)  # fp32 sums
    assert results["kid_clip_std"] == 0 and ours.kid.subsets == 100


def train_clip_on_pairs(images: torch.Tensor, captions: list[str], steps: int = 60):
    """A tiny CLIP fitted to these pairs with open_clip's contrastive loss: it matches them."""
    torch.manual_seed(0)
    card = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 8,
            "width": 32,
            "layers": 1,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    model = open_clip.CLIP(**card)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=24)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pixels, tokens = ((images + 1) / 2 - mean) / std, tokenizer(captions)
    loss_fn, optimizer = open_clip.ClipLoss(), torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(steps):
        image_features, text_features, scale = model(pixels, tokens)
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    set_model_preprocess_cfg(
        model, {"size": 32, "mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    )
    return model, card, float(loss.detach())


def test_clip_score_is_higher_for_matching_than_for_shuffled_prompts(val_set, tmp_path):
    """On a CLIP trained here on 8 image-caption pairs of the shapes data (not hand-made
    features): its score of the true captions beats the same captions rolled by one."""
    images, captions = val_set.images[:8], val_set.captions[:8]
    assert len(set(captions)) == 8
    model, card, loss = train_clip_on_pairs(images, captions)
    assert loss < 0.5  # it has learned the pairs
    metrics = SampleMetrics(load_clip(save_clip(model, card, tmp_path / "clip", "tiny")), None)
    metrics.update(images, captions)
    matching = float(metrics.compute()["clip_score"])
    metrics.reset()
    metrics.update(images, captions[1:] + captions[:1])
    shuffled = float(metrics.compute()["clip_score"])
    assert -1 <= shuffled < matching - 0.2 <= 1
    assert set(metrics.compute()) == {"clip_score"}  # no features, no tasks: nothing else


def test_zero_shot_accuracy_is_prompt_accuracy(clip_dir, val_set):
    images, labels = val_set.images[:32], val_set.metas[:32]
    metrics = SampleMetrics(load_clip(clip_dir), None, tasks=SHAPE_TASKS, batch_size=5)
    metrics.update(images[:20], labels=labels[:20])
    metrics.update(images[20:], labels=[{}] * 4 + labels[24:])  # 4 unlabelled: left out
    results = {k: float(v) for k, v in metrics.compute().items()}
    labels = labels[:20] + [{}] * 4 + labels[24:]
    assert results == pytest.approx(prompt_accuracy(clip_dir, images, labels, SHAPE_TASKS))
    assert set(results) == {"shape_acc", "colour_acc", "accuracy"}
    assert results["accuracy"] <= min(results["shape_acc"], results["colour_acc"])


def test_rank_share_gives_every_rank_the_same_count_and_each_item_once():
    for n, world in [(10, 3), (2, 4), (8, 2)]:
        shares = [rank_share(n, rank, world) for rank in range(world)]
        assert len({len(indices) for indices, _ in shares}) == 1
        own = [i for indices, mine in shares for i in indices[:mine]]
        assert sorted(own) == list(range(n))


def generate_share(
    sample_fn: SampleFn,
    prompts: Sequence[str],
    labels: Sequence[Mapping] | None,
    n: int,
    seed: int,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, list[str], list[Mapping] | None]:
    """(How validation draws its share, composed here from sample_share.) This rank's images of n per prompt (image j of a prompt from seed + j, as on one process),
    with their prompts and labels, the padding already dropped."""
    repeated, seeds = per_prompt(prompts, n, seed)
    images, indices, own = sample_share(sample_fn, repeated, seeds, rank, world_size)
    kept = indices[:own]
    kept_labels = [labels[i // n] for i in kept] if labels is not None else None
    return images[:own], [repeated[i] for i in kept], kept_labels


def test_ranks_generate_together_what_one_process_generates():
    prompts = ["a red circle", "a blue cross", "a green square"]
    labels = [{"shape": "circle"}, {"shape": "cross"}, {"shape": "square"}]
    calls = []

    def sample_fn(batch_prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Image i is a function of its prompt and seed only, as with the real sampler."""
        calls.append(len(seeds))
        codes = [100 * prompts.index(p) + s for p, s in zip(batch_prompts, seeds, strict=True)]
        return torch.tensor(codes, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)

    def made(world: int) -> dict[float, tuple[str, dict]]:
        found = {}
        for rank in range(world):
            images, own_prompts, own_labels = generate_share(
                sample_fn, prompts, labels, 2, 7, rank, world
            )
            for image, prompt, label in zip(images, own_prompts, own_labels, strict=True):
                assert float(image[0, 0, 0]) not in found  # no image twice
                found[float(image[0, 0, 0])] = (prompt, label)
        return found

    alone = made(1)
    assert len(alone) == 6 and alone[100 + 8] == ("a blue cross", {"shape": "cross"})
    calls.clear()
    assert made(4) == alone
    assert calls == [2, 2, 2, 2]  # padded: every rank samples as many images


def test_build_sample_metrics_from_paths_and_config(clip_dir, val_set):
    zero_shot = compose_config([]).data.zero_shot
    metrics = build_sample_metrics(str(clip_dir), "clip", zero_shot=zero_shot, batch_size=16)
    assert set(metrics.tasks) == {"shape", "colour"} and metrics.batch_size == 16
    assert build_sample_metrics(None, None, zero_shot=zero_shot).tasks == {}  # no CLIP: no tasks
    with pytest.raises(UserError, match="CLIP features need a CLIP folder"):
        build_sample_metrics(None, "clip")
    with pytest.raises(UserError, match="features='fid' is not valid"):
        build_sample_metrics(str(clip_dir), "fid")


def ddp_worker(rank: int, rendezvous: str, clip_dir: Path, data: dict, out: Path) -> None:
    """Rank 0 gets the first 20 reference images and every generated one, rank 1 the last 12
    reference images and none: the ranks update a different number of times."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        metrics = SampleMetrics(load_clip(clip_dir), "clip", tasks=SHAPE_TASKS, kid_subset_size=8)
        for batch in data["reference"][:20].split(8) if rank == 0 else [data["reference"][20:]]:
            metrics.add_reference(batch)
        if rank == 0:
            metrics.update(data["generated"], data["prompts"], data["labels"])
        results = {k: float(v) for k, v in metrics.compute().items()}
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two DDP processes (forked: they start with this one's imports)
def test_metrics_are_the_same_on_one_and_two_ddp_processes(clip_dir, val_set, tmp_path):
    data = {
        "reference": val_set.images[:32],
        "generated": val_set.images[32:48].flip(-1),
        "prompts": val_set.captions[16:32],
        "labels": val_set.metas[32:48],
    }
    metrics = SampleMetrics(load_clip(clip_dir), "clip", tasks=SHAPE_TASKS, kid_subset_size=8)
    metrics.add_reference(data["reference"])
    metrics.update(data["generated"], data["prompts"], data["labels"])
    alone = {k: float(v) for k, v in metrics.compute().items()}
    args = (str(tmp_path / "rendezvous"), clip_dir, data, tmp_path)
    context = mp.start_processes(ddp_worker, args=args, nprocs=2, join=False, start_method="fork")
    for _ in range(30):  # a hung collective fails the test instead of the whole run
        if context.join(timeout=10):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the DDP processes did not finish in 300 s")
    for rank in range(2):
        together = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert together == pytest.approx(alone, rel=1e-4, abs=1e-6), rank
    assert set(alone) >= {"fd_clip", "kid_clip", "clip_score", "shape_acc", "accuracy"}


def write_random_inception(path: Path) -> Path:
    """A randomly initialised Inception-v3 in torch-fidelity's layout (its real weights are a
    download); torch-fidelity's constructor always loads weights, so that step is skipped here."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        torch.manual_seed(0)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    pytest.importorskip("torch_fidelity")
    return write_random_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


def test_inception_fd_equals_torchmetrics_fid_on_8_bit_images(inception_weights, val_set):
    real, fake = to_uint8(val_set.images[:12]), to_uint8(val_set.images[12:24].flip(-1))
    as_ours = lambda pixels: pixels.float() / 127.5 - 1  # noqa: E731 (uint8 -> [-1, 1])
    ours = SampleMetrics(None, "inception", inception_weights, inception_layer=64)
    ours.add_reference(as_ours(real))
    ours.update(as_ours(fake))
    results = ours.compute()
    fid = FrechetInceptionDistance(
        feature=64, feature_extractor_weights_path=str(inception_weights)
    )
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert set(results) == {"fid_inception", "kid_inception", "kid_inception_std"}
    assert results["fid_inception"] == pytest.approx(float(fid.compute()), rel=1e-5)
    assert results["fid_inception"] > 0
    features = InceptionFeatures(inception_weights)(val_set.images[:2])  # any size: resized to 299
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


class Payload:
    """Anything a pickle may carry besides tensors (here harmless; it could run code on load)."""


def test_inception_weights_load_from_safetensors_too(inception_weights, val_set, tmp_path):
    state = torch.load(inception_weights, weights_only=True)
    safetensors.torch.save_file(state, tmp_path / "inception.safetensors")
    images = val_set.images[:2]
    from_pth = InceptionFeatures(inception_weights, layer=64)(images)
    assert torch.equal(InceptionFeatures(tmp_path / "inception.safetensors", 64)(images), from_pth)


def test_inception_weights_load_without_unpickling_code(tmp_path, monkeypatch):
    bad = tmp_path / "bad.pth"
    torch.save({"x": Payload()}, bad)
    with pytest.raises(UserError, match="not a weights file"):
        InceptionFeatures(bad)
    with pytest.raises(UserError, match="no Inception weights at"):
        InceptionFeatures(tmp_path / "missing.pth")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"ldm_train\[metrics\]"):
        InceptionFeatures(bad)


@pytest.mark.slow
def test_evaluate_cli_writes_metrics_json_for_an_export(trained, tmp_path, run_cli):
    export = trained[1]
    out = tmp_path / "eval"
    args = [str(export), "--n", "2", "--steps", "2", "--out", str(out)]
    result = run_cli(["-m", "ldm_train.evaluate", *args], tmp_path, timeout=600)
    assert "generating: 100%" in result.stderr  # the progress bar
    metrics = json.loads((out / "metrics.json").read_text())
    # The run's config (beside the export): its 8 labelled data.prompts, val shards, zero_shot.
    assert metrics["settings"]["n_images"] == 16 and metrics["settings"]["n_reference"] == 64
    for key in ("fd_clip", "kid_clip", "clip_score", "shape_acc", "colour_acc", "accuracy"):
        assert isinstance(metrics[key], float), key
    assert metrics["fd_clip"] > 0 and -1 <= metrics["clip_score"] <= 1
    assert (out / "samples" / "grid.png").is_file()


@pytest.mark.slow
def test_evaluate_takes_a_checkpoint_and_val_captions_as_prompts(trained, tmp_path):
    run_dir = trained[1].parent
    out = tmp_path / "eval"
    args = [str(run_dir), "data.prompts=null", "--max-prompts", "3", "--n", "1", "--steps", "2"]
    assert main([*args, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["n_prompts"] == 3 and "accuracy" in metrics  # val json labels
    images = json.loads((out / "samples" / "images.json").read_text())
    val_urls = OmegaConf.load(run_dir / "config.yaml").data.val_urls
    first = read_validation(val_urls, loader_options({}, 32), limit=3)
    assert [image["prompt"] for image in images] == first.captions


def test_evaluate_errors_are_one_line(trained, tmp_path, capsys):
    export = str(trained[1])
    for args, expected in [
        ([str(tmp_path)], "neither a unet export"),
        ([export, "--features", "inception"], "--inception-weights"),
        ([export, "oops"], "overrides are key=value"),
        ([export, "--n", "0"], "'0' must be an integer from 1"),
    ]:
        try:
            code = main([*args, "--out", str(tmp_path / "out")])
        except SystemExit as exit:  # argparse's own errors (rules.Parser: one line, exit code 2)
            code = exit.code
        assert code == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and expected in error, error

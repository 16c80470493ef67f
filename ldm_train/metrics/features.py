"""Image feature extractors for the sample metrics: images in [-1, 1], N x 3 x H x W of any H x W,
in; N x D features out.

- "clip": the image tower of a CLIP folder (ldm_train.formats.clip_model), with the folder's own resize
  and normalisation. Its projected image embedding, unnormalised (clean-fid's choice for CLIP
  features). Works offline with the experiment's own stage=clip export.
- "inception": torchmetrics' NoTrainInceptionV3 (torch-fidelity's port of the TF Inception-v3 the
  published FIDs use) from a weights file on disk: its 2048-d pool features by default.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Literal, get_args

import torch
from torchvision.transforms.v2 import functional as TF

from ldm_train.errors import UserError, check_choice
from ldm_train.formats.clip_model import LoadedClip, read_weights

FeatureKind = Literal["clip", "inception"]
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)
INCEPTION_LAYERS = (64, 192, 768, 2048)  # Inception-v3 layers torchmetrics' FID can read
INCEPTION_EXTRA = "metrics"  # the optional extra that brings torch-fidelity


class ClipImageFeatures(torch.nn.Module):
    """The image tower of a CLIP, its preprocessing done on tensors: resize (the shortest side to
    the tower's size, then a centre crop; "squash" folders: straight to the size) and normalise."""

    def __init__(self, clip: LoadedClip):
        super().__init__()
        self.visual = clip.model.visual.eval().requires_grad_(False)
        size = self.visual.image_size
        self.size = [size, size] if isinstance(size, int) else list(size)
        preprocess = getattr(self.visual, "preprocess_cfg", None) or {}
        self.squash = preprocess.get("resize_mode") == "squash"
        self.interpolation = TF.InterpolationMode(preprocess.get("interpolation", "bicubic"))
        # Plain tensors, moved per call: the tower may have been moved with the whole CLIP.
        self.mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(clip.std).view(1, 3, 1, 1)
        self.num_features = int(self.visual.output_dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.float() + 1) / 2
        resize_to = self.size if self.squash else [min(self.size)]
        pixels = TF.resize(pixels, resize_to, self.interpolation, antialias=True)
        pixels = TF.center_crop(pixels, self.size).clamp(0, 1)
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(self.preprocess(images)).float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> 0..255 rounded: the 8-bit images Inception's FID is defined on (as saved PNGs)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class InceptionFeatures(torch.nn.Module):
    """torchmetrics' NoTrainInceptionV3 (resizes to 299 itself) on 8-bit images."""

    def __init__(self, weights: str | Path, layer: int = 2048):
        super().__init__()
        check_choice("inception layer", layer, INCEPTION_LAYERS)
        if importlib.util.find_spec("torch_fidelity") is None:
            raise UserError(
                "Inception features need torch-fidelity: pip install 'ldm_train[metrics]' "
                f"(in a checkout: pip install -e '.[{INCEPTION_EXTRA}]')"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        weights = Path(weights)
        if not weights.is_file():
            raise UserError(
                f"no Inception weights at {weights}: pass the file torch-fidelity downloads "
                "(torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3), saved on disk"
            )
        try:
            state = read_weights(weights)  # safetensors, or torch.load(weights_only=True)
        except Exception as error:
            raise UserError(f"{weights}: not a weights file ({error})") from None
        # torch-fidelity reads its file with torch.load(weights_only=False), which would run code
        # pickled in it: it gets a copy holding only the tensors read safely above.
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "inception.pt"
            torch.save(dict(state), copy)
            try:
                self.net = NoTrainInceptionV3(
                    name="inception-v3-compat",
                    features_list=[str(layer)],
                    feature_extractor_weights_path=str(copy),
                )
            except RuntimeError as error:
                raise UserError(f"{weights}: not Inception-v3 FID weights ({error})") from None
        self.num_features = layer

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_uint8(images)).float()


def build_extractor(
    kind: FeatureKind,
    clip: LoadedClip | None = None,
    inception_weights: str | Path | None = None,
    inception_layer: int = 2048,
) -> ClipImageFeatures | InceptionFeatures:
    """The extractor of `kind`: "clip" needs a loaded CLIP, "inception" a weights file."""
    check_choice("features", kind, FEATURE_KINDS)
    if kind == "clip":
        if clip is None:
            raise UserError(
                "CLIP features need a CLIP folder (a stage=clip export, or --clip DIR); or choose "
                "Inception features with a weights file"
            )
        return ClipImageFeatures(clip)
    if inception_weights is None:
        raise UserError(
            "Inception features need a weights file on disk (--inception-weights FILE); or "
            "choose CLIP features"
        )
    return InceptionFeatures(inception_weights, inception_layer)

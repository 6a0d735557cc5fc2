"""InceptionV3 features for FID/KID (2048-d pool3) and IS (1008-way logits), from local weights.

The real extractor is torch-fidelity's `FeatureExtractorInceptionV3`: the TF-ported FID
network (pt_inception-2015-12-05) that torchmetrics' FID/KID/IS use, fed uint8 RGB images
which it resizes to 299x299 with TF1-compatible bilinear interpolation and scales to [-1, 1]
(the "standard FID preprocessing"). Its weights file is a plain state dict (`.pth`).

The tiny stand-in has the same interface (uint8 NCHW in; (pool3 (n, 2048), logits (n, 1008))
out), the same preprocessing and the same file format (a state dict plus a marker key), and
is loaded through the same path: `evaluate.inception_weights` = 'tiny' builds it, seeded, into
the cache and then loads it from that file like any local or s3:// weights file.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from t2id.evaluate.weights import resolve_weights_file

FID_SIZE = 299  # InceptionV3 input side for FID (Heusel et al. 2017; torch-fidelity)
POOL3_DIM = 2048
IS_CLASSES = 1008  # the TF InceptionV3 classifier head (1000 ImageNet classes + 8 unused)
TINY_MARKER = "t2id_tiny_inception"  # state-dict key that identifies the stand-in
CONFIG_KEY = "evaluate.inception_weights"


def fid_preprocess(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, h, w) -> float (n, 3, 299, 299) in [-1, 1], exactly as the FID InceptionV3 does."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = images_u8.to(torch.float32)
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(FID_SIZE, FID_SIZE), align_corners=False)
    return (x - 128) / 128


class TinyInception(nn.Module):
    """Random stand-in with the FID InceptionV3's interface: small conv stack, 2048-d 'pool3', 1008 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=4, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.pool3 = nn.Linear(64, POOL3_DIM)
        self.fc = nn.Linear(POOL3_DIM, IS_CLASSES)

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool3 = torch.relu(self.pool3(self.convs(fid_preprocess(images_u8))))  # non-negative, like pool3
        logits = pool3 @ self.fc.weight.T  # 'logits_unbiased': the head without its bias, as IS uses
        return pool3, logits


class RealInception(nn.Module):
    """torch-fidelity's FID InceptionV3 returning (pool3 '2048', 'logits_unbiased')."""

    def __init__(self, weights_path: Path) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights_path))

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool3, logits = self.net(images_u8)
        return pool3, logits


def build_tiny_inception(path: Path, seed: int = 0) -> Path:
    """Write the seeded random stand-in as a state-dict file at `path` (same format as real weights)."""
    torch.manual_seed(seed)
    model = TinyInception()
    # Wider weights than PyTorch's default init: pool3 of order 1 (like the real network's) and
    # logits of order 1, so the stand-in's FID and IS show differences instead of a uniform softmax.
    nn.init.normal_(model.pool3.weight, std=4.0)
    nn.init.normal_(model.fc.weight, std=0.1)
    state = model.state_dict()
    state[TINY_MARKER] = torch.tensor([seed])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # actors on one node may build at once
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def resolve_inception(source: str, cache_dir: Path, endpoint_url: str | None = None) -> Path:
    """Local weights file for `evaluate.inception_weights`: 'tiny' (built into the cache), a path or s3:// URI."""
    if source == "tiny":
        path = Path(cache_dir).expanduser() / "tiny" / "inception-tiny-seed0.pt"
        return path if path.is_file() else build_tiny_inception(path, seed=0)
    return resolve_weights_file(source, cache_dir, CONFIG_KEY, endpoint_url)


def check_inception_source(source: str, endpoint_url: str | None = None) -> None:
    """Fail early, on the driver, with the config key when `evaluate.inception_weights` does not exist
    (without downloading it: the actors that load it fetch it into their node's cache)."""
    from t2id.errors import UserError
    from t2id.evaluate.weights import CACHE_HINT
    from t2id.store import open_store

    if source == "tiny":
        return
    if source.startswith("s3://"):
        parent, _, name = source.rstrip("/").rpartition("/")
        present = bool(name) and open_store(parent, endpoint_url=endpoint_url).exists(name)
    else:
        present = Path(source).expanduser().is_file()
    if not present:
        raise UserError(f"{CONFIG_KEY}: {source} not found; " + CACHE_HINT.format(kind="file"))


def load_inception(weights_path: Path, device: str = "cpu") -> nn.Module:
    """Load a weights file (torch-fidelity state dict or the tiny stand-in); eval mode, no grads."""
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        from t2id.errors import UserError

        raise UserError(f"{CONFIG_KEY}: {weights_path} is not a PyTorch state-dict file ({exc}); "
                        "use torch-fidelity's weights-inception-2015-12-05 .pth") from None
    if TINY_MARKER in state:
        model: nn.Module = TinyInception()
        model.load_state_dict({k: v for k, v in state.items() if k != TINY_MARKER})
    else:
        model = RealInception(weights_path)
    return model.to(device).eval().requires_grad_(False)


def detector_resize(image: Image.Image, imgsz: int) -> Image.Image:
    """The image as the detector's loader sees it (ultralytics `load_image` while training): long side
    -> imgsz, aspect kept, bilinear (cv2.INTER_LINEAR), sides ceil'ed and capped at imgsz. Real and
    synthetic images of mixed sizes are compared at the size the detector trains on."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    h, w = rgb.shape[:2]
    r = imgsz / max(h, w)
    if r == 1:
        return Image.fromarray(rgb)
    import cv2

    size = (min(math.ceil(w * r), imgsz), min(math.ceil(h * r), imgsz))
    return Image.fromarray(cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR))


def image_to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode; ultrasound is often greyscale) -> uint8 (3, h, w) RGB tensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@torch.no_grad()
def extract_features(model: nn.Module, images: list[Image.Image], batch_size: int = 32,
                     device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(pool3 (n, 2048), logits (n, 1008)) float32 for a list of images, in input order.

    Images are batched by size: the network resizes every image to 299 itself, so a batch must
    share one input size, and pre-resizing elsewhere would change the standard preprocessing.
    """
    n = len(images)
    pool3 = np.zeros((n, POOL3_DIM), dtype=np.float32)
    logits = np.zeros((n, IS_CLASSES), dtype=np.float32)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_size[image.size].append(index)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch_u8 = torch.stack([image_to_uint8_chw(images[i]) for i in chunk]).to(device)
            feats, logit = model(batch_u8)
            pool3[chunk] = feats.float().cpu().numpy()
            logits[chunk] = logit.float().cpu().numpy()
    return pool3, logits

"""Memorization check: how close is each synthetic image to the nearest image its generator saw?

The lung-ultrasound study (papers/lung-ultrasound-textual-inversion-ddpm.txt, Sec. 5-6) warns that
diffusion models trained on few images may produce "just memorized variations of the training set",
which then act as oversampling, not as new data. t2id scores every synthetic image against the
images its LoRA trained on (lora/fold=<k>/train_ids.json) and flags near-copies:
  pixels  grey image resized to `size` px (area interpolation), mean-centred and L2-normalized;
          similarity = cosine = Pearson correlation of the pixels, in [-1, 1]. One matrix product.
  ssim    mean SSIM (Wang et al. 2004, eq. 13; 7x7 uniform windows, C1 = (0.01 L)^2, C2 = (0.03 L)^2,
          L = 255) at `size` px, in [-1, 1].
An inpainted image equals its real source outside the mask by construction, so for it only the
mask's rectangle is compared, against the same rectangle of every training image: that asks
whether the generator reproduced training content where it was allowed to draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import uniform_filter

from t2id.store import Store

WORK_SIDE = 256  # training images are kept at this side (grey) so crops of a mask rectangle stay sharp
SSIM_WINDOW = 7
C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2

Rect = tuple[float, float, float, float]  # normalized (x0, y0, x1, y1)


def grey(image: Image.Image | np.ndarray, side: int) -> np.ndarray:
    """Grey pixels (float32, 0-255) resized to side x side with area interpolation."""
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("L"))
    else:
        pixels = np.asarray(image)
        if pixels.ndim == 3:
            pixels = cv2.cvtColor(pixels.astype(np.uint8), cv2.COLOR_RGB2GRAY)
    return cv2.resize(pixels.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)


def crop(pixels_hw: np.ndarray, rect: Rect | None, size: int) -> np.ndarray:
    """The normalized rectangle of a grey image, resized to size x size (the whole image when rect is None)."""
    if rect is not None:
        h, w = pixels_hw.shape
        x0, y0, x1, y1 = rect
        c0, r0 = int(np.floor(max(0.0, x0) * w)), int(np.floor(max(0.0, y0) * h))
        c1, r1 = max(c0 + 1, int(np.ceil(min(1.0, x1) * w))), max(r0 + 1, int(np.ceil(min(1.0, y1) * h)))
        pixels_hw = pixels_hw[r0:r1, c0:c1]
    if pixels_hw.shape != (size, size):
        pixels_hw = cv2.resize(pixels_hw, (size, size), interpolation=cv2.INTER_AREA)
    return pixels_hw


def pixel_features(stack_nhw: np.ndarray) -> np.ndarray:
    """(N, H*W) mean-centred, unit-norm vectors; a flat image becomes the zero vector (similarity 0)."""
    flat = stack_nhw.reshape(len(stack_nhw), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 1e-9)


def ssim_against(a_hw: np.ndarray, stack_nhw: np.ndarray) -> np.ndarray:
    """Mean SSIM of one image against each image of a stack (same size), vectorized over the stack."""
    a = np.broadcast_to(a_hw.astype(np.float64), stack_nhw.shape)
    b = stack_nhw.astype(np.float64)
    win = (1, SSIM_WINDOW, SSIM_WINDOW)
    mu_a, mu_b = uniform_filter(a, win), uniform_filter(b, win)
    var_a = uniform_filter(a * a, win) - mu_a**2
    var_b = uniform_filter(b * b, win) - mu_b**2
    cov = uniform_filter(a * b, win) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / ((mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2))
    pad = SSIM_WINDOW // 2  # drop the border, where windows hang over the edge
    return ssim_map[:, pad:-pad or None, pad:-pad or None].mean(axis=(1, 2))


def nearest_neighbours(synthetic: Sequence[np.ndarray], training: Sequence[np.ndarray], feature: str = "pixels",
                       size: int = 64, rects: Sequence[Rect | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarity to the nearest training image, its index) for each synthetic image.

    Images are grey arrays as returned by `grey(..., WORK_SIDE)`; `rects[i]` restricts the comparison of
    synthetic image i to that rectangle (in both images); None compares whole images.
    """
    if feature not in ("pixels", "ssim"):
        raise ValueError(f"feature must be 'pixels' or 'ssim', got {feature!r}")
    m = len(synthetic)
    scores, index = np.full(m, np.nan), np.full(m, -1, dtype=np.int64)
    if m == 0 or len(training) == 0:
        return scores, index
    rects = list(rects) if rects is not None else [None] * m
    whole = np.stack([crop(t, None, size) for t in training])
    whole_features = pixel_features(whole) if feature == "pixels" else None
    for i, (image, rect) in enumerate(zip(synthetic, rects)):
        query = crop(image, rect, size)
        train = whole if rect is None else np.stack([crop(t, rect, size) for t in training])
        if feature == "pixels":
            feats = whole_features if rect is None else pixel_features(train)
            sims = feats @ pixel_features(query[None])[0]
        else:
            sims = ssim_against(query, train)
        j = int(np.argmax(sims))
        scores[i], index[i] = float(sims[j]), j
    return scores, index


def flag_memorized(scores: np.ndarray, threshold: float) -> np.ndarray:
    """True where an image is at least `threshold` similar to a training image (NaN: not flagged)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.where(np.isnan(scores), False, scores >= threshold)


def histogram_png(scores: Sequence[float], threshold: float) -> bytes:
    """The score distribution with the flag threshold (label/memorization_hist.png), as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: safe in Ray workers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    values = np.asarray(scores, dtype=np.float64)
    ax.hist(values[~np.isnan(values)], bins=30, color="tab:purple")
    ax.axvline(threshold, color="k", linestyle="--", label=f"flag threshold {threshold:g}")
    ax.legend()
    ax.set_xlabel("nearest-neighbour similarity to the generator's training images")
    ax.set_ylabel("synthetic images")
    ax.set_title("Memorization check")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def load_grey(store: Store, uri: str, side: int = WORK_SIDE) -> np.ndarray:
    """A store image (full URI) as grey pixels at side x side."""
    import io

    return grey(Image.open(io.BytesIO(store.read_bytes(store.key_of(uri)))), side)


def score_rows(store: Store, rows: list[dict], training: list[dict], feature: str, size: int, threshold: float,
               reject: bool, train_pixels: list[np.ndarray] | None = None) -> list[dict]:
    """Add nn_similarity, nn_image_id and memorized to synthetic rows; reject flagged rows when asked.

    An inpainted row (its `mask_rects` set) is compared inside the union of its mask rectangles only.
    `train_pixels`: the training images already loaded with `load_grey` (top-up rounds reuse them).
    """
    import json

    if train_pixels is None:
        train_pixels = [load_grey(store, r["uri"]) for r in training]
    syn_pixels = [load_grey(store, r["uri"]) for r in rows]
    rects = []
    for r in rows:
        masks = json.loads(r["mask_rects"]) if r.get("mask_rects") else []
        rects.append((min(m[0] for m in masks), min(m[1] for m in masks), max(m[2] for m in masks),
                      max(m[3] for m in masks)) if masks else None)
    scores, index = nearest_neighbours(syn_pixels, train_pixels, feature, size, rects)
    flags = flag_memorized(scores, threshold)
    out = []
    for r, score, j, flagged in zip(rows, scores, index, flags):
        r = {**r, "nn_similarity": None if np.isnan(score) else float(score),
             "nn_image_id": training[j]["image_id"] if j >= 0 else None, "memorized": bool(flagged)}
        if flagged and reject and r.get("kept") is not False:
            r["kept"] = False
            r["reject_reason"] = f"memorized: {feature} similarity {score:.3f} >= {threshold:g} to {r['nn_image_id']}"
        out.append(r)
    return out

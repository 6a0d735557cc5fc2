"""A deterministic neck-ultrasound-like YOLO dataset (the phantom) for the demo, tests and benchmarks.

It mimics what matters for the method, not anatomy in detail:
  - a B-mode look: Rayleigh speckle (magnitude of a smoothed complex Gaussian field), depth
    attenuation exp(-alpha * depth), per-subject gain and depth, log-like compression;
  - the paper's six classes, each with its own echo pattern and plausible place in a transverse
    neck scan (strap muscles superficial and lateral, thyroid lobes lateral and deeper, the
    laryngo-tracheal structures in the midline);
  - subjects scanned as cine loops: a probe sweep from cranial (thyroid cartilage, vocal folds)
    to caudal (cricoid, tracheal rings, thyroid lobes). Neighbouring frames share the subject's
    speckle field and differ by a small probe shift, so they look alike: splitting frames of one
    subject across folds would leak, which is why folds group by subject;
  - a long-tailed class distribution like the paper's Fig. 2: tracheal rings and vocal folds are
    seen only at the ends of the sweep, so they are the rarest; strap muscles (two per frame) the
    most frequent. Every class appears at least once per subject, so a k-fold split with
    k <= subjects can place every class in every fold.

Patterns are large and high-contrast so a tiny YOLO at 64-128 px learns the common classes in
an epoch or two. Output: images/*.png (8-bit grayscale), labels/*.txt (YOLO), data.yaml
(ultralytics; names), subjects.csv (image,subject). Same arguments -> byte-identical files.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from t2id.data.config import PAPER_CLASSES

PHANTOM_VERSION = 1  # bump when the rendering changes: data stage caches key on it
THYROID_CARTILAGE, CRICOID, TRACHEAL_RING, STRAP_MUSCLE, THYROID_LOBE, VOCAL_FOLD = range(6)

# Where along the cranial(0) -> caudal(1) sweep each structure is in view. Narrow windows at the
# ends of the sweep make tracheal ring and vocal fold rare (paper Fig. 2: the long tail).
WINDOWS = {
    VOCAL_FOLD: (-0.1, 0.14),
    THYROID_CARTILAGE: (-0.1, 0.42),
    CRICOID: (0.40, 0.64),
    THYROID_LOBE: (0.50, 1.1),
    TRACHEAL_RING: (0.87, 1.1),
    STRAP_MUSCLE: (-0.1, 1.1),
}
P_VISIBLE = 0.92  # a structure inside its window is still missed now and then (probe tilt)


@dataclass(frozen=True)
class Subject:
    """Per-subject acquisition and anatomy: what makes frames of one subject alike."""

    gain: float  # overall brightness
    alpha: float  # attenuation per image height (depth-dependent darkening)
    depth: float  # vertical scale of the anatomy (neck thickness)
    dx: float  # lateral offset of the midline
    size_scale: float  # structure size
    sweep: tuple[float, float]  # part of the cranial->caudal sweep the loop covers
    noise_seed: int


def _subject(seed: int, index: int) -> Subject:
    rng = np.random.default_rng([seed, index, 1])
    start = rng.uniform(-0.06, 0.02)
    return Subject(
        gain=float(rng.uniform(0.75, 1.25)),
        alpha=float(rng.uniform(0.4, 1.6)),
        depth=float(rng.uniform(0.9, 1.1)),
        dx=float(rng.uniform(-0.05, 0.05)),
        size_scale=float(rng.uniform(0.92, 1.08)),
        sweep=(float(start), float(rng.uniform(0.98, 1.06))),
        noise_seed=int(rng.integers(2**31)),
    )


def _frame_positions(subject: Subject, frames: int) -> np.ndarray:
    a, b = subject.sweep
    if frames == 1:
        return np.array([0.5 * (a + b)])
    return np.linspace(a, b, frames)


def _visible_classes(seed: int, s: int, t_per_frame: np.ndarray) -> list[set[int]]:
    """Which structures each frame shows; every class at least once per subject."""
    rng = np.random.default_rng([seed, s, 2])
    visible: list[set[int]] = []
    for t in t_per_frame:
        shown = {c for c, (lo, hi) in WINDOWS.items() if lo <= t <= hi and rng.random() < P_VISIBLE}
        visible.append(shown)
    for c, (lo, hi) in WINDOWS.items():
        if not any(c in v for v in visible):  # force the frame nearest the window centre
            nearest = int(np.argmin(np.abs(t_per_frame - 0.5 * (lo + hi))))
            visible[nearest].add(c)
    return visible


# --- shape primitives on a normalized grid (X, Y in [0, 1]); soft edges avoid aliasing -------

def _soft(distance: np.ndarray, half_width: float, px: float) -> np.ndarray:
    """1 inside |distance| < half_width, 0 outside, a ~1.5 px ramp between."""
    return np.clip((half_width - distance) / (1.5 * px) + 0.5, 0.0, 1.0)


def _segment_distance(X, Y, p0, p1):
    (x0, y0), (x1, y1) = p0, p1
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * vx + (Y - y0) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    return np.hypot(X - (x0 + t * vx), Y - (y0 + t * vy))


def _ellipse(X, Y, cx, cy, a, b):
    return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2


def _render(size: int, subject: Subject, t: float, shift: tuple[float, float], shown: set[int],
            rng: np.random.Generator, base_noise: np.ndarray) -> tuple[np.ndarray, list[tuple]]:
    px = 1.0 / size
    axis = (np.arange(size, dtype=np.float32) + 0.5) * px
    X, Y = np.meshgrid(axis, axis)
    d, k = subject.depth, subject.size_scale
    cx = 0.5 + subject.dx + shift[0] + 0.03 * np.sin(2.0 * np.pi * t)  # midline drifts along the sweep
    boxes: list[tuple] = []

    # 1. Echogenicity map: skin line, subcutaneous fat, soft tissue.
    echo = np.full((size, size), 0.34, np.float32)
    echo[Y < 0.05 * d] = 0.22
    echo += (0.55 * _soft(np.abs(Y - 0.03 * d), 0.006, px)).astype(np.float32)

    def add_box(cls, x0, y0, x1, y1):
        x0, y0, x1, y1 = (float(np.clip(v, 0.0, 1.0)) for v in (x0, y0, x1, y1))
        if x1 - x0 > 4 * px and y1 - y0 > 4 * px:
            boxes.append((cls, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))

    def region(x0, y0, x1, y1):
        """Pixel window around a structure (3 px margin): shapes are drawn only where they are."""
        c0, r0 = max(int(x0 * size) - 3, 0), max(int(y0 * size) - 3, 0)
        c1, r1 = min(int(x1 * size) + 4, size), min(int(y1 * size) + 4, size)
        window = (slice(r0, r1), slice(c0, c1))
        return window, X[window], Y[window]

    # 2. Strap muscles: superficial, lateral, dark bands with bright fibrillar striations.
    if STRAP_MUSCLE in shown:
        for side in (-1, 1):
            mx, my = cx + side * 0.2 * k, 0.15 * d
            a, b = 0.17 * k, 0.045 * k
            w, Xw, Yw = region(mx - a, my - b, mx + a, my + b)
            body = _ellipse(Xw, Yw, mx, my, a, b) < 1.0
            stripes = 0.5 + 0.5 * np.cos(2.0 * np.pi * (Yw - my) / (0.022 * k))
            echo[w] = np.where(body, 0.10 + 0.55 * stripes ** 4, echo[w])
            add_box(STRAP_MUSCLE, mx - a, my - b, mx + a, my + b)

    # 3. Thyroid lobes: lateral, deeper; bright homogeneous ground-glass ovals with a capsule.
    if THYROID_LOBE in shown:
        for side in (-1, 1):
            lx, ly = cx + side * 0.25 * k, 0.42 * d
            a, b = 0.15 * k, 0.12 * k
            w, Xw, Yw = region(lx - 1.1 * a, ly - 1.1 * b, lx + 1.1 * a, ly + 1.1 * b)
            r2 = _ellipse(Xw, Yw, lx, ly, a, b)
            echo[w] = np.where(r2 < 1.0, 0.78, echo[w]) + 0.5 * _soft(np.abs(np.sqrt(r2) - 1.0), 0.04, px * 8)
            add_box(THYROID_LOBE, lx - a, ly - b, lx + a, ly + b)

    # 4. Thyroid cartilage: a thick bright inverted V with an acoustic shadow beneath it.
    if THYROID_CARTILAGE in shown:
        ax_, ay, hw, hh = cx, 0.28 * d, 0.2 * k, 0.2 * k
        w, Xw, Yw = region(ax_ - hw - 0.03, ay - 0.03, ax_ + hw + 0.03, 1.0)
        legs = np.minimum(_segment_distance(Xw, Yw, (ax_, ay), (ax_ - hw, ay + hh)),
                          _segment_distance(Xw, Yw, (ax_, ay), (ax_ + hw, ay + hh)))
        # shadow: below the legs, inside their lateral span
        below = (Yw > ay + hh * np.abs(Xw - ax_) / hw) & (np.abs(Xw - ax_) < hw)
        shadowed = np.where(below, echo[w] * 0.35, echo[w])
        echo[w] = np.maximum(shadowed, 1.0 * _soft(legs, 0.014 * k, px))
        add_box(THYROID_CARTILAGE, ax_ - hw - 0.015, ay - 0.015, ax_ + hw + 0.015, ay + hh + 0.015)

    # 5. Vocal folds (inside the thyroid cartilage): dark bow-tie triangles with bright edges.
    if VOCAL_FOLD in shown:
        vy, hw, hh = 0.43 * d, 0.11 * k, 0.07 * k
        w, Xw, Yw = region(cx - hw, vy - hh, cx + hw, vy + hh)
        ux = np.abs(Xw - cx)
        tri = (ux < hw) & (np.abs(Yw - vy) < hh * ux / hw)  # two triangles meeting at the midline
        edge = np.minimum(
            np.minimum(_segment_distance(Xw, Yw, (cx - hw, vy - hh), (cx + hw, vy + hh)),
                       _segment_distance(Xw, Yw, (cx - hw, vy + hh), (cx + hw, vy - hh))),
            ux + np.where(np.abs(Yw - vy) < hh, 0.0, 1.0))
        echo[w] = np.maximum(np.where(tri, 0.04, echo[w]), 0.95 * _soft(edge, 0.006, px))
        add_box(VOCAL_FOLD, cx - hw, vy - hh, cx + hw, vy + hh)

    # 6. Cricoid cartilage: a thick, uniformly bright arch (ring), anechoic inside.
    if CRICOID in shown:
        ry, r, th = 0.42 * d, 0.13 * k, 0.035 * k
        w, Xw, Yw = region(cx - r - th, ry - r - th, cx + r + th, ry + 0.02)
        dist = np.hypot(Xw - cx, Yw - ry)
        upper = Yw < ry + 0.02
        inner = np.where(upper & (dist < r - th / 2), 0.05, echo[w])
        echo[w] = np.where(upper, np.maximum(inner, 0.98 * _soft(np.abs(dist - r), th / 2, px)), inner)
        add_box(CRICOID, cx - r - th / 2, ry - r - th / 2, cx + r + th / 2, ry + 0.02)

    # 7. Tracheal ring: a dark cartilage arch lined by a bright air-mucosa line, then
    #    reverberation artefacts (repeated bright lines) and the air's shadow below it.
    if TRACHEAL_RING in shown:
        ry, r, th = 0.40 * d, 0.11 * k, 0.03 * k
        w, Xw, Yw = region(cx - r - th, ry - r - th, cx + r + th, 1.0)
        dist = np.hypot(Xw - cx, Yw - ry)
        upper = Yw < ry
        e = np.where(upper & (np.abs(dist - r) < th / 2), 0.06, echo[w])
        e = np.where(upper, np.maximum(e, 1.0 * _soft(np.abs(dist - (r - th / 2)), 0.005, px)), e)
        below = (np.abs(Xw - cx) < r * 0.9) & (Yw > ry - r * 0.5)
        for i in range(1, 4):
            line = _soft(np.abs(Yw - (ry - r * 0.55 + i * 0.045 * k)), 0.004, px)
            e = np.where(below, np.maximum(e * 0.6, (1.0 - 0.2 * i) * line), e)
        echo[w] = e
        add_box(TRACHEAL_RING, cx - r - th / 2, ry - r - th / 2, cx + r + th / 2, ry - r * 0.55 + 3.6 * 0.045 * k)

    # 8. Speckle: the subject's field shifted with the probe, mixed with a little fresh noise.
    h, w = size, size
    margin = 8 + int(0.1 * size)  # _subject_noise pads by 2 * margin; shifts are within +-0.09
    sy, sx = int(round(shift[1] * size)) + margin, int(round(shift[0] * size)) + margin
    fresh = rng.standard_normal((2, h, w), dtype=np.float32)
    sigma = max(0.6, 1.1 * size / 320)
    re = cv2.GaussianBlur(0.9 * base_noise[0, sy:sy + h, sx:sx + w] + 0.44 * fresh[0], (0, 0), sigma)
    im = cv2.GaussianBlur(0.9 * base_noise[1, sy:sy + h, sx:sx + w] + 0.44 * fresh[1], (0, 0), sigma)
    speckle = cv2.magnitude(re, im) * base_noise[2, sy:sy + h, sx:sx + w]
    speckle /= speckle.mean() + 1e-6  # Rayleigh-distributed, mean 1

    # 9. Depth attenuation, gain, compression to 8 bits.
    atten = np.exp(np.float32(-subject.alpha) * Y)
    intensity = np.maximum(echo * speckle * atten * np.float32(subject.gain / 1.1), 0.0)
    image = np.clip(255.0 * cv2.pow(intensity, 0.6), 0, 255).astype(np.uint8)
    return image, boxes


def _subject_noise(subject: Subject, size: int) -> np.ndarray:
    rng = np.random.default_rng(subject.noise_seed)
    m = size + 2 * (8 + int(0.1 * size))  # margin for the probe shift
    fields = rng.standard_normal((3, m, m), dtype=np.float32)  # speckle: real and imaginary parts
    # Tissue inhomogeneity: a smooth multiplicative field, the subject's "fingerprint" in every frame.
    smooth = cv2.GaussianBlur(fields[2], (0, 0), size / 16)
    fields[2] = np.exp(0.35 * smooth / (smooth.std() + 1e-6))
    return fields


def write_phantom(out_dir: str | os.PathLike[str], subjects: int = 6, frames_per_subject: int = 10,
                  size: int = 320, seed: int = 0, workers: int | None = None) -> Path:
    """Write the phantom YOLO dataset to `out_dir`; returns `out_dir`. Deterministic in its arguments."""
    if subjects < 1 or frames_per_subject < 1 or size < 32:
        raise ValueError("need subjects >= 1, frames_per_subject >= 1, size >= 32")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)

    jobs = []
    for s in range(subjects):
        subj = _subject(seed, s)
        ts = _frame_positions(subj, frames_per_subject)
        shown = _visible_classes(seed, s, ts)
        for f, t in enumerate(ts):
            jobs.append((s, f, subj, float(t), shown[f]))

    noise_cache: dict[int, np.ndarray] = {}

    def noise_of(s: int, subj: Subject) -> np.ndarray:
        if s not in noise_cache:
            noise_cache[s] = _subject_noise(subj, size)
        return noise_cache[s]

    def one(job) -> tuple[str, str]:
        s, f, subj, t, shown = job
        rng = np.random.default_rng([seed, s, f, 3])
        # probe jitter: small lateral/vertical shifts, correlated through the sweep position
        shift = (0.02 * np.sin(3.1 * t + s) + rng.normal(0, 0.002), 0.015 * np.cos(2.3 * t + s))
        shift = (float(np.clip(shift[0], -0.09, 0.09)), float(np.clip(shift[1], -0.09, 0.09)))
        image, boxes = _render(size, subj, t, shift, shown, rng, noise_of(s, subj))
        name = f"s{s:02d}_f{f:03d}"
        ok, png = cv2.imencode(".png", image)
        assert ok
        (out / "images" / f"{name}.png").write_bytes(png.tobytes())
        lines = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in boxes)
        (out / "labels" / f"{name}.txt").write_text(lines)
        return f"images/{name}.png", f"s{s:02d}"

    for s in range(subjects):  # build the noise fields before threads share them
        noise_of(s, _subject(seed, s))
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(one, jobs))

    (out / "subjects.csv").write_text("image,subject\n" + "".join(f"{p},{g}\n" for p, g in rows))
    data_yaml = {"train": "images", "val": "images", "nc": len(PAPER_CLASSES),
                 "names": dict(enumerate(PAPER_CLASSES))}
    (out / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False))
    params = {"version": PHANTOM_VERSION, "subjects": subjects, "frames_per_subject": frames_per_subject,
              "size": size, "seed": seed}
    (out / "phantom.json").write_text(json.dumps(params, sort_keys=True))
    return out

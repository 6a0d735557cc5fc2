"""The phantom's image-level variant: transverse neck scan PLANES as classes, long-tailed, subject-grouped.

Same drawing code as the detection phantom (t2id.data.phantom._render: speckle, attenuation, the six
structures); what changes is the label. Each frame of a subject's cranial -> caudal sweep is one view
plane, named by the structure that defines it, and shows that plane's structures:

    vocal fold plane        (sweep < 0.07)       thyroid cartilage + vocal folds + strap muscles   rare
    thyroid cartilage plane (0.07 .. 0.42)       thyroid cartilage + strap muscles
    cricoid plane           (0.42 .. 0.62)       cricoid + strap muscles
    thyroid lobe plane      (0.62 .. 0.95)       thyroid lobes + strap muscles
    tracheal ring plane     (>= 0.95)            tracheal ring + thyroid lobes + strap muscles      rare

The narrow windows at the sweep's ends make the first and last planes rare, as fetal-plane (FU-LoRA)
and lung-ultrasound ('viral pneumonia') datasets are long-tailed. Every plane is forced into every
subject at least once (the frame nearest the window's centre), so a k-fold split with k <= subjects can
validate every class in every fold.

Output: an image-folder dataset, `<out>/<plane>/s<subject>_f<frame>.png` (8-bit grayscale),
`subjects.csv` (image,subject; image paths relative to `<out>`), `classes.txt` (class order, one per
line) and `phantom.json`. Same arguments -> byte-identical files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from t2id.data.phantom import (CRICOID, STRAP_MUSCLE, THYROID_CARTILAGE, THYROID_LOBE, TRACHEAL_RING, VOCAL_FOLD,
                               _frame_positions, _render, _subject, _subject_noise)

CLASSIFY_PHANTOM_VERSION = 1  # bump when the rendering or the labels change: the data stage's cache keys on it
CLASSES_FILE = "classes.txt"

# (plane name, upper end of its sweep window, structures it shows), cranial to caudal.
PLANES: list[tuple[str, float, frozenset[int]]] = [
    ("vocal fold plane", 0.07, frozenset({THYROID_CARTILAGE, VOCAL_FOLD, STRAP_MUSCLE})),
    ("thyroid cartilage plane", 0.42, frozenset({THYROID_CARTILAGE, STRAP_MUSCLE})),
    ("cricoid plane", 0.62, frozenset({CRICOID, STRAP_MUSCLE})),
    ("thyroid lobe plane", 0.95, frozenset({THYROID_LOBE, STRAP_MUSCLE})),
    ("tracheal ring plane", np.inf, frozenset({TRACHEAL_RING, THYROID_LOBE, STRAP_MUSCLE})),
]
PLANE_NAMES = [name for name, _, _ in PLANES]


def plane_of(t: float) -> int:
    """Index of the plane at sweep position t."""
    return next(i for i, (_, upper, _) in enumerate(PLANES) if t < upper)


def frame_planes(ts: np.ndarray) -> list[int]:
    """Plane of every frame; each plane forced onto the free frame nearest its window centre if absent."""
    planes = [plane_of(float(t)) for t in ts]
    lowers = [-np.inf] + [upper for _, upper, _ in PLANES[:-1]]
    for p, (lo, (_, hi, _)) in enumerate(zip(lowers, PLANES)):
        if p in planes or len(ts) < len(PLANES):
            continue
        centre = 0.5 * (max(lo, 0.0) + min(hi, 1.0))
        counts = np.bincount(planes, minlength=len(PLANES))
        # only take a frame from a plane that keeps at least one frame
        free = [i for i in np.argsort(np.abs(ts - centre), kind="stable") if counts[planes[i]] > 1]
        if free:
            planes[int(free[0])] = p
    return planes


def write_classify_phantom(out_dir: str | os.PathLike[str], subjects: int = 6, frames_per_subject: int = 12,
                           size: int = 64, seed: int = 0) -> Path:
    """Write the image-level phantom to `out_dir`; returns it. Deterministic in its arguments."""
    if subjects < 1 or frames_per_subject < 1 or size < 32:
        raise ValueError("need subjects >= 1, frames_per_subject >= 1, size >= 32")
    out = Path(out_dir)
    for name in PLANE_NAMES:
        (out / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(subjects):
        subj = _subject(seed, s)
        noise = _subject_noise(subj, size)
        ts = _frame_positions(subj, frames_per_subject)
        for f, (t, plane) in enumerate(zip(ts, frame_planes(ts))):
            rng = np.random.default_rng([seed, s, f, 5])
            shift = (float(np.clip(0.02 * np.sin(3.1 * t + s) + rng.normal(0, 0.004), -0.09, 0.09)),
                     float(np.clip(0.015 * np.cos(2.3 * t + s), -0.09, 0.09)))
            image, _boxes = _render(size, subj, float(t), shift, set(PLANES[plane][2]), rng, noise)
            rel = f"{PLANE_NAMES[plane]}/s{s:02d}_f{f:03d}.png"
            ok, png = cv2.imencode(".png", image)
            assert ok
            (out / rel).write_bytes(png.tobytes())
            rows.append((rel, f"s{s:02d}"))
    (out / "subjects.csv").write_text("image,subject\n" + "".join(f"{p},{g}\n" for p, g in rows))
    (out / CLASSES_FILE).write_text("".join(f"{name}\n" for name in PLANE_NAMES))
    params = {"version": CLASSIFY_PHANTOM_VERSION, "task": "classify", "subjects": subjects,
              "frames_per_subject": frames_per_subject, "size": size, "seed": seed}
    (out / "phantom.json").write_text(json.dumps(params, sort_keys=True))
    return out

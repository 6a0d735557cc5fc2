"""Boxes as location tokens in the prompt (lora.method layout_lora; GeoDiffusion, Chen et al. 2023,
arXiv 2306.04607, Sec. 3.1-3.2).

GeoDiffusion discretizes each box corner onto a grid of location bins and writes the box into the
text prompt as "<class> <L_x1> <L_y1> <L_x2> <L_y2>", learnt by fine-tuning the text encoder with the
denoiser. t2id keeps that rendering with lora.layout.bins bins per side, writes a bin index as the
CLIP vocabulary's own number token (so no new embedding rows are needed: the text encoders' LoRA, on
by the recipe, learns what the numbers mean), and keeps at most lora.layout.max_boxes boxes of the
prompted class per image (the largest), so the prompt stays inside CLIP's 77 tokens.

Training: a real image's prompt is its class prompt followed by the location phrase of its boxes of
that class. Generation: `sample_layout` draws the requested boxes of an image from the fold's TRAIN
boxes of that class (one real image's layout of the class, chosen by the row's seed), snapped to the
bin grid; the image's manifest row carries exactly those boxes (label_source 'layout').
"""

from __future__ import annotations

import math
import random

BOX_KEYS = ("class_id", "x", "y", "w", "h")


def to_bins(box: dict, bins: int) -> tuple[int, int, int, int]:
    """A normalized centre-format box -> (x1, y1, x2, y2) bin indices in [0, bins - 1], x2 >= x1, y2 >= y1."""
    def clamp(v: int) -> int:
        return min(bins - 1, max(0, v))

    # The left/top edge's bin holds the edge; the right/bottom edge's bin is the last one the box enters
    # (an edge exactly on a bin border does not enter the next bin), so snapping twice changes nothing.
    x1, y1 = clamp(math.floor((box["x"] - box["w"] / 2) * bins)), clamp(math.floor((box["y"] - box["h"] / 2) * bins))
    x2 = clamp(math.ceil((box["x"] + box["w"] / 2) * bins) - 1)
    y2 = clamp(math.ceil((box["y"] + box["h"] / 2) * bins) - 1)
    return x1, y1, max(x1, x2), max(y1, y2)


def from_bins(class_id: int, corners: tuple[int, int, int, int], bins: int) -> dict:
    """Bin indices -> the normalized centre-format box they stand for (the bins' outer edges)."""
    x1, y1, x2, y2 = corners
    left, top, right, bottom = x1 / bins, y1 / bins, (x2 + 1) / bins, (y2 + 1) / bins
    return {"class_id": int(class_id), "x": (left + right) / 2, "y": (top + bottom) / 2,
            "w": right - left, "h": bottom - top}


def snap(boxes: list[dict], bins: int) -> list[dict]:
    """Boxes as the prompt states them: each snapped to its bins' outer edges."""
    return [from_bins(b["class_id"], to_bins(b, bins), bins) for b in boxes]


def class_boxes(boxes: list[dict], class_id: int, max_boxes: int) -> list[dict]:
    """The boxes of `class_id`, largest first, at most `max_boxes`, then left to right (a stable order)."""
    mine = sorted((b for b in boxes if b["class_id"] == class_id), key=lambda b: -b["w"] * b["h"])[:max_boxes]
    return sorted(mine, key=lambda b: (b["x"], b["y"]))


def location_phrase(class_name: str, boxes: list[dict], bins: int) -> str:
    """GeoDiffusion's '<class> <L_x1> <L_y1> <L_x2> <L_y2>' per box, numbers as words."""
    return " and ".join(f"{class_name} at {' '.join(str(v) for v in to_bins(b, bins))}" for b in boxes)


def layout_prompt(prompt: str, class_name: str, boxes: list[dict], bins: int) -> str:
    if not boxes:
        return prompt
    return f"{prompt}, {location_phrase(class_name, boxes, bins)}"


def sample_layout(layouts: list[list[dict]], seed: int, bins: int) -> list[dict]:
    """One of the fold's real layouts of a class (lists of that class's boxes), chosen by `seed`, snapped."""
    if not layouts:
        return []
    return snap(layouts[random.Random(seed).randrange(len(layouts))], bins)


def iou(a: dict, b: dict) -> float:
    """Intersection over union of two normalized centre-format boxes."""
    ax1, ay1, ax2, ay2 = a["x"] - a["w"] / 2, a["y"] - a["h"] / 2, a["x"] + a["w"] / 2, a["y"] + a["h"] / 2
    bx1, by1, bx2, by2 = b["x"] - b["w"] / 2, b["y"] - b["h"] / 2, b["x"] + b["w"] / 2, b["y"] + b["h"] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a["w"] * a["h"] + b["w"] * b["h"] - inter
    return inter / union if union > 0 else 0.0


def matched_boxes(requested: list[dict], detected: list[dict], threshold: float = 0.5) -> int:
    """How many requested boxes a detection of the same class covers with IoU >= threshold (each detection
    matches at most one requested box; greedy by IoU, as detection-metric matching does)."""
    pairs = sorted(((iou(r, d), i, j) for i, r in enumerate(requested) for j, d in enumerate(detected)
                    if r["class_id"] == d["class_id"]), reverse=True)
    used_r, used_d = set(), set()
    for value, i, j in pairs:
        if value < threshold:
            break
        if i not in used_r and j not in used_d:
            used_r.add(i)
            used_d.add(j)
    return len(used_r)

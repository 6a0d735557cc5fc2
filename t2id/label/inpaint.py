"""Inpaint-in-box: new target-class content inside the boxes of real TRAIN images; boxes are inherited.

For each target class of a fold (lora.target_classes), N images:
  1. Plan: index i gets a seed from the generate helper's `derive_seed` (namespace 'inpaint:<class>'),
     a source = one of the fold's real TRAIN images holding the class (picked by the seed), and a mask =
     each of the source's target-class boxes grown by label.inpaint.box_margin. Names and keys follow
     generate's `image_name`, under layout.label.inpaint(k, label.method)/{images,records}/<class-slug>/.
  2. Verify and run exactly once with generate's machinery (t2id.generate.core): `verified_records`
     finds rows already done (record present, same parameters, PNG checksum matches); the executor
     the stage hands in (generate's Ray Data layer) runs the rest on an actor pool of
     `InpaintGenerator`, a subclass of generate's `ImageGenerator` (same pipeline loading, LoRA,
     seeding, quality gate, atomic PNG + JSON record commit). Its settings are the label settings,
     whose `inpainting` field is generate's settings with the label.inpaint overrides.
  3. `InpaintGenerator.render` builds `StableDiffusionXLInpaintPipeline.from_pipe` on the fold's
     text-to-image pipeline (same UNet with the fold's adapter, VAE, text encoders), inpaints the
     mask with the class prompt, and pastes the result into the source inside the mask only: the VAE
     round trip would otherwise alter every pixel (diffusers' `apply_overlay` does the same), and
     the inherited boxes of the untouched structures must stay true.
  4. Rows: SYNTHETIC_SCHEMA with the source's boxes copied exactly, label_source and method 'inpaint'
     (adapter_method: the adapter's lora.method), plus the source image id and the mask rectangles.
The inpainted image is mostly real, so the optional CLIP-score gate of generate is not applied.
label.method inpaint_outpaint (t2id.label.outpaint) plans the same rows, adds step 2 to the render, and
keeps only the boxes step 2 left untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from t2id import layout
from t2id.data.manifest import SYNTHETIC_SCHEMA, image_id_of, load_fold_rows
from t2id.errors import UserError
from t2id.events import Events, LogEvents
from t2id.generate.core import Executor, execute_rows, record_from_batch, remove_stale, verified_records
from t2id.generate.plan import PlanClass, derive_seed, gen_params, image_name, params_digest
from t2id.generate.quality import judge
from t2id.generate.worker import ImageGenerator
from t2id.label.settings import LabelSettings
from t2id.store import Store

Rect = tuple[float, float, float, float]  # normalized (x0, y0, x1, y1)


def mask_rects(boxes: list[dict], class_id: int, margin: float) -> list[Rect]:
    """Rectangles (x0, y0, x1, y1), normalized and clipped, of the class's boxes grown by margin x size."""
    rects = []
    for b in boxes:
        if b["class_id"] != class_id:
            continue
        half_w, half_h = b["w"] * (0.5 + margin), b["h"] * (0.5 + margin)
        rects.append((max(0.0, b["x"] - half_w), max(0.0, b["y"] - half_h),
                      min(1.0, b["x"] + half_w), min(1.0, b["y"] + half_h)))
    return rects


def mask_array(rects: list[Rect], width: int, height: int) -> np.ndarray:
    """uint8 (H, W) mask: 255 inside any rectangle (to be inpainted), 0 elsewhere (kept)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in rects:
        c0, r0 = int(math.floor(x0 * width)), int(math.floor(y0 * height))
        c1, r1 = int(math.ceil(x1 * width)), int(math.ceil(y1 * height))
        mask[r0:r1, c0:c1] = 255
    return mask


def source_pixels(store: Store, key: str, width: int, height: int) -> np.ndarray:
    """The real source image as uint8 RGB (H, W, 3) at the generation size (boxes are normalized)."""
    image = Image.open(io.BytesIO(store.read_bytes(key))).convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


class InpaintGenerator(ImageGenerator):
    """generate's callable class with an inpainting `render`, built from the label settings (their
    `inpainting` generate settings and label.inpaint.strength); needs the plan columns source_key and
    mask_rects."""

    PLAN_COLUMNS = (*ImageGenerator.PLAN_COLUMNS, "source_key", "mask_rects")

    def __init__(self, settings: LabelSettings, store: Store, fold: int, cache_dir: str,
                 endpoint_url: str | None = None, device: str = "cpu", torch_threads: int | None = None) -> None:
        s = LabelSettings.model_validate(settings.model_dump())
        if s.inpainting is None:
            raise ValueError("InpaintGenerator needs label settings of an inpaint method (label.method: inpaint or "
                             "inpaint_outpaint)")
        # loads the fold's SDXL pipeline + adapter, scheduler, quality gate
        super().__init__(s.inpainting, store, fold, cache_dir, endpoint_url, device, torch_threads)
        from diffusers import StableDiffusionXLInpaintPipeline

        self.inpaint = StableDiffusionXLInpaintPipeline.from_pipe(self.pipe)  # shares the components
        self.inpaint.set_progress_bar_config(disable=True)
        self.label = s.label
        self.strength = s.label.inpaint.strength
        self._rows: list[tuple[str, list[Rect]]] = []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # render() sees prompts and seeds only; the batch's sources and masks are handed over here.
        self._rows = [(str(k), [tuple(r) for r in json.loads(str(m))])
                      for k, m in zip(batch["source_key"], batch["mask_rects"])]
        return super().__call__(batch)

    def render(self, prompts: list[str], negative_prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        images = []
        for (source_key, rects), prompt, negative, seed in zip(self._rows, prompts, negative_prompts, seeds):
            source = source_pixels(self.store, source_key, self.width, self.height)
            images.append(self.paint(source, mask_array(rects, self.width, self.height), prompt, negative, seed,
                                     self.strength))
        return images

    def paint(self, image: np.ndarray, mask: np.ndarray, prompt: str, negative: str, seed: int,
              strength: float) -> np.ndarray:
        """`image` repainted inside `mask` (uint8 H x W, 255 = repaint) with one pipeline call, pasted there only."""
        generator = torch.Generator(self.device).manual_seed(int(seed))
        with torch.inference_mode():
            out = self.inpaint(prompt=prompt, negative_prompt=negative if negative.strip() else None,
                               image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
                               num_inference_steps=self.steps, guidance_scale=self.guidance,
                               width=self.width, height=self.height, generator=generator, output_type="np")
        painted = (np.clip(out.images[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return np.where(mask[:, :, None] > 0, painted, image)  # step 3: outside the mask the image stays


def plan_inpaint(store: Store, s: LabelSettings, fold: int, classes: list[PlanClass], lora_sha256: str,
                 ranges: dict[str, tuple[int, int]] | None = None, round_: int = 0) -> list[dict]:
    """Step 1: the plan rows of the fold (deterministic from the settings and the fold's train rows).

    `ranges` (class name -> (first index, count)) plans a top-up round; default: indices 0..N-1 of every
    class. An index always gets the same seed, source and mask, whichever round plans it."""
    from t2id.label.outpaint import keep_rect, outpaint_seed

    assert s.inpainting is not None
    gen, inp, out = s.inpainting, s.label.inpaint, s.label.outpaint
    method = s.label.method
    g = gen.generate
    train = load_fold_rows(store, fold, "train").to_pylist()
    params = gen_params(gen, lora_sha256)
    rows = []
    for cls in classes:
        candidates = [r for r in train if any(b["class_id"] == cls.class_id for b in r["boxes"] or [])]
        if not candidates:
            continue  # the stage reports classes without a source image
        start, count = (0, g.images_per_class) if ranges is None else ranges.get(cls.name, (0, 0))
        for index in range(start, start + count):
            seed = derive_seed(gen.run_seed, fold, f"inpaint:{cls.name}", index)
            source = candidates[seed % len(candidates)]
            rects = mask_rects(source["boxes"], cls.class_id, inp.box_margin)
            prompt = cls.prompts[index % len(cls.prompts)]
            name = image_name(fold, cls.name, index, seed)
            parts: dict[str, Any] = {
                "generate": params_digest(prompt, seed, params), "source": source["sha256"], "rects": rects,
                "strength": inp.strength, "method": "inpaint-in-box/v1"}
            extra: dict[str, Any] = {}
            if method == "inpaint_outpaint":  # step 2 (t2id.label.outpaint)
                keep, seed2 = keep_rect(rects, out.keep_margin), outpaint_seed(seed, fold, cls.name, index)
                extra = {"keep_rect": json.dumps(keep), "outpaint_seed": seed2}
                parts.update(method="inpaint-then-outpaint/v1", keep=keep, outpaint_seed=seed2,
                             outpaint_strength=out.strength, outpaint_prompt=out.prompt or prompt)
            digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
            rows.append({**extra,
                "fold": fold, "class_id": cls.class_id, "class_name": cls.name, "index": index, "round": round_,
                "seed": seed,
                "prompt": prompt, "negative_prompt": g.negative_prompt, "name": name,
                "key": layout.label.inpaint_image(fold, cls.name, name, method),
                "record_key": layout.label.inpaint_record(fold, cls.name, name, method),
                "params_digest": digest, "source_key": store.key_of(source["uri"]),
                "source_image_id": source["image_id"], "source_boxes": source["boxes"],
                "mask_rects": json.dumps(rects),
            })
    return rows


def inpaint_fold(store: Store, s: LabelSettings, fold: int, classes: list[PlanClass], executor: Executor,
                 events: Events | None = None, ranges: dict[str, tuple[int, int]] | None = None, round_: int = 0
                 ) -> tuple[list[dict], dict[str, Any]]:
    """Steps 1-4 for one fold (one round: `ranges` as in plan_inpaint), idempotent: (rows for labels.parquet,
    summary facts). Each row also carries its plan's `key` and `record_key` (for `remove_stale_inpaint`).

    `executor` renders plan rows with `InpaintGenerator` workers (the stage: generate's Ray Data layer)."""
    assert s.inpainting is not None
    events = events or LogEvents()
    gen = s.inpainting
    g = gen.generate
    strengths = {"label.inpaint.strength": s.label.inpaint.strength}
    if s.label.method == "inpaint_outpaint":
        strengths["label.outpaint.strength"] = s.label.outpaint.strength
    for field, strength in strengths.items():
        if int(g.steps * strength) < 1:  # the pipeline denoises only the last strength x steps
            raise UserError(f"{field}={strength} x steps={g.steps} leaves no denoising step; raise "
                            f"label.inpaint.steps or {field}")
    lora_sha256 = store.sha256(gen.generator_key(fold)) if gen.use_adapter else ""
    plan = plan_inpaint(store, s, fold, classes, lora_sha256, ranges, round_)
    records = verified_records(store, plan, set(store.list(layout.label.inpaint(fold, s.label.method))),
                               need_clip=False)
    reused = len(records)
    todo = [r for r in plan if r["key"] not in records]
    if todo:
        def make_record(batch: dict[str, Any], i: int, row: dict) -> dict:
            return record_from_batch(batch, i, row, gen.base_model, g.scheduler, lora_sha256)

        what = f"label fold {fold}: inpainted images" + (f" (top-up round {round_})" if round_ else "")
        with events.progress(what, len(todo)) as advance:
            execute_rows(f"label fold {fold} inpainting", todo, executor, records, make_record, advance)
    rows = [inpaint_row(store, row, records[row["key"]], s) for row in plan]
    return rows, {"planned": len(plan), "made": len(plan) - reused, "reused": reused}


def remove_stale_inpaint(store: Store, fold: int, rows: list[dict], method: str = "inpaint") -> int:
    """Delete inpainted images/records of the fold and method that no round of the current plan names (an
    older config's), so the method's folder holds exactly what labels.parquet lists."""
    return remove_stale(store, rows, [layout.label.inpaint_images(fold, method),
                                      layout.label.inpaint_records(fold, method)])


def inpaint_row(store: Store, row: dict, record: dict, s: LabelSettings) -> dict:
    """Step 4: a labels.parquet row (SYNTHETIC_SCHEMA columns + inpaint provenance)."""
    assert s.inpainting is not None
    g = s.inpainting.generate
    verdict = judge(record["std"], record["entropy"], None, g.quality)  # current thresholds
    out: dict[str, Any] = {name: None for name in SYNTHETIC_SCHEMA.names}
    boxes = [dict(b) for b in row["source_boxes"]]
    if s.label.method == "inpaint_outpaint":  # boxes whose pixels step 2 regenerated are dropped, and recorded
        from t2id.label.outpaint import split_boxes

        boxes, dropped = split_boxes(boxes, tuple(json.loads(row["keep_rect"])))
        out.update(keep_rect=row["keep_rect"], dropped_boxes=dropped, dropped_count=len(dropped),
                   step_seeds=json.dumps({"inpaint": row["seed"], "outpaint": row["outpaint_seed"]}))
    out.update({
        "image_id": image_id_of(record["sha256"]), "uri": store.ref(row["key"]),
        "width": record["width"], "height": record["height"],
        "group": f"synthetic-fold{row['fold']}-{layout.slug(row['class_name'])}", "source": "synthetic",
        "boxes": boxes, "sha256": record["sha256"], "fold": row["fold"],
        "class_id": row["class_id"], "prompt": row["prompt"], "negative_prompt": row["negative_prompt"],
        "seed": row["seed"], "steps": g.steps, "guidance": g.guidance, "scheduler": g.scheduler,
        "base_model": record["base_model"], "lora_sha256": record["lora_sha256"], "entropy": record["entropy"],
        "std": record["std"], "clip_score": None, "kept": verdict.kept,
        "reject_reason": verdict.reject_reason or None, "label_source": s.label.method,
        "method": s.label.method,  # the generator (issue 20's name): inpaint | inpaint_outpaint
        "adapter_method": s.inpainting.method,  # the recipe of the fold's adapter that inpainted (lora.method)
        "source_image_id": row["source_image_id"], "mask_rects": row["mask_rects"], "round": row["round"],
        "key": row["key"], "record_key": row["record_key"],
    })
    return out

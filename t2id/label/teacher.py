"""Teacher pseudo-labels: a detector trained on a fold's real TRAIN images boxes its synthetic images.

  1. Teacher weights per fold (`label.teacher.source`): train one with the detect helper
     (`t2id.detect.train.detect`, strategy `baseline`, label.teacher.detector or grid.detector) on
     the fold's materialized dataset with no synthetic rows. ultralytics needs a val split to pick
     best.pt; the teacher's data yaml points val at the TRAIN images, so the fold's validation
     images are never read. The weights (layout.label.teacher_weights) are a unit memo
     (t2id.resume) keyed by the fold's data, the detector settings and the seed, so a rerun reuses
     them. Or reuse the grid's baseline weights of the fold.
  2. Predict boxes on every kept synthetic image (ultralytics `YOLO(weights).predict`, offline).
  3. Keep boxes with confidence >= label.min_confidence; class-consistency gate: the class the
     image was prompted for must be among them, else the image is rejected with that reason.
     Rows of lora.method layout_lora (label_source 'layout') keep the boxes they were asked for: the
     teacher's detections only measure layout fidelity (`layout_matched`: requested boxes a detection
     of their class covers with IoU >= lora.layout.fidelity_iou), never replace or gate them.
Plain functions: `label_fold` runs steps 1-3 wherever it is called; the stage calls it inside a Ray
task with the teacher's resources (t2id.label.ray_layer), never on the driver.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from t2id import layout
from t2id.data.manifest import load_classes
from t2id.detect.config import PRESETS, DetectorConfig
from t2id.devices import resolve_device, ultralytics_device
from t2id.errors import UserError
from t2id.label.settings import LabelSettings
from t2id.resume import Memo, memoized
from t2id.store import Store

REJECT_NOT_FOUND = "target class not found"


@dataclass(frozen=True)
class PredBox:
    class_id: int
    confidence: float
    x: float  # normalized centre format, like the manifests
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class GateVerdict:
    boxes: list[dict]  # BOX_TYPE dicts of the kept boxes
    confidence: float | None  # highest confidence of a kept target-class box (None: none found)
    kept: bool
    reject_reason: str  # "" when kept


def gate_boxes(preds: list[PredBox], target_class: int, min_confidence: float, class_consistency: bool,
               class_name: str = "") -> GateVerdict:
    """Step 3: drop boxes below min_confidence; reject the image when its target class is missing."""
    kept = [p for p in preds if p.confidence >= min_confidence]
    target = [p.confidence for p in kept if p.class_id == target_class]
    boxes = [{"class_id": p.class_id, "x": p.x, "y": p.y, "w": p.w, "h": p.h} for p in kept]
    confidence = max(target) if target else None
    if class_consistency and not target:
        what = f"'{class_name}'" if class_name else f"id {target_class}"
        return GateVerdict(boxes, None, False,
                           f"{REJECT_NOT_FOUND}: no {what} box with confidence >= {min_confidence:g}")
    return GateVerdict(boxes, confidence, True, "")


def teacher_data_yaml(data_yaml: Path, out_dir: Path) -> Path:
    """A copy of the fold's data.yaml whose val split is its TRAIN split (step 1: val images stay unseen)."""
    spec = yaml.safe_load(Path(data_yaml).read_text())
    spec["path"] = str(Path(spec.get("path") or Path(data_yaml).parent).resolve())
    spec["val"] = spec["train"]
    out = Path(out_dir) / "teacher-data.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def teacher_memo(store: Store, fold: int, detector: DetectorConfig, seed: int, ignore: bool = False) -> Memo:
    """The fold's trained teacher as a unit of work: the fold's real data, the detector settings, the seed."""
    identity = {"fold": int(fold), "detector": detector.model_dump(mode="json"), "seed": int(seed),
                "strategy": "baseline", "val": "train",
                "inputs": {k: store.sha256(k) for k in (layout.data.manifest, layout.split.folds, layout.data.classes)}}
    return Memo(store, layout.memo(layout.label.teacher(fold)), identity, ignore=ignore)


def train_teacher(store: Store, fold: int, detector: DetectorConfig, cache_dir: Path, seed: int,
                  device: str = "cpu", workers: int = 0, force: bool = False) -> tuple[str, bool]:
    """Train the fold's teacher, or reuse the one trained before with the same identity (unless `force`).

    Returns (run-relative key of its best.pt, reused). `device` is 'cuda' or 'cpu' (t2id.devices)."""
    from t2id.data.materialize import materialize_fold
    from t2id.detect.train import detect

    weights_key = layout.label.teacher_weights(fold)
    memo = teacher_memo(store, fold, detector, seed, ignore=force)

    def train() -> tuple[list[str], dict]:
        fold_data = materialize_fold(store, fold, cache_dir, synthetic=None)
        work = Path(cache_dir).expanduser() / "label-teacher" / f"fold{fold}-{memo.digest[:12]}"
        if work.exists():  # a killed earlier attempt: start clean so ultralytics does not mix runs
            shutil.rmtree(work)
        data_yaml = teacher_data_yaml(fold_data.data_yaml, work)
        result = detect(data_yaml, PRESETS["baseline"], detector, work / "runs", seed,
                        device=ultralytics_device(device), workers=workers)
        store.write_file(weights_key, result.best_weights)
        return [weights_key], {"train_fit_map50_95": result.overall.get("map50_95")}

    _, reused = memoized(memo, train)
    return weights_key, reused


def resolve_teacher(store: Store, fold: int, s: LabelSettings, cache_dir: Path, device: str,
                    force: bool = False) -> tuple[str, str]:
    """(run-relative key of the fold's teacher weights, where they came from) for label.teacher.source."""
    grid_key = layout.grid.weights(fold, "baseline")
    source = s.label.teacher.source
    if source in ("grid", "auto") and store.exists(grid_key):
        return grid_key, "grid baseline"
    if source == "grid":
        raise UserError(f"label.teacher.source is 'grid' but {store.uri(grid_key)} does not exist: run the "
                        "grid stage with the baseline strategy first, or set label.teacher.source: train")
    assert s.teacher_detector is not None  # settings() sets it for the teacher method
    key, reused = train_teacher(store, fold, s.teacher_detector, cache_dir, s.seed, device,
                                s.label.teacher.workers, force)
    return key, "reused" if reused else "trained"


def local_weights(store: Store, key: str, cache_dir: Path) -> Path:
    """The weights file in the local cache, keyed by content (predict needs a local path)."""
    sha = store.sha256(key)
    path = Path(cache_dir).expanduser() / "label-teacher" / "weights" / f"{sha[:16]}.pt"
    if not path.exists():
        store.read_file(key, path)
    return path


class Teacher:
    """Step 2: the fold's detector as a box predictor (ultralytics YOLO, nothing downloaded)."""

    def __init__(self, weights: Path, imgsz: int, device: str = "cpu", iou: float = 0.7,
                 min_confidence: float = 0.25) -> None:
        from ultralytics import YOLO

        self.model = YOLO(str(weights), task="detect")
        self.imgsz, self.device, self.iou = imgsz, device, iou
        self.conf = max(min_confidence, 1e-3)  # the gate applies min_confidence again; this only saves work

    def predict(self, images: list[Image.Image], batch: int = 16) -> list[list[PredBox]]:
        out: list[list[PredBox]] = []
        for start in range(0, len(images), batch):
            chunk = [np.asarray(im.convert("RGB"))[:, :, ::-1].copy() for im in images[start:start + batch]]  # BGR
            results = self.model.predict(chunk, imgsz=self.imgsz, conf=self.conf, iou=self.iou, device=self.device,
                                         verbose=False, save=False)
            for result in results:
                boxes = result.boxes
                cls = boxes.cls.cpu().numpy().astype(int)
                conf = boxes.conf.cpu().numpy().astype(float)
                xywhn = boxes.xywhn.cpu().numpy().astype(float)
                out.append([PredBox(int(c), float(p), *map(float, b)) for c, p, b in zip(cls, conf, xywhn)])
        return out


def label_with_teacher(store: Store, rows: list[dict], teacher: Teacher, names: list[str], min_confidence: float,
                       class_consistency: bool, fidelity_iou: float = 0.5) -> list[dict]:
    """Steps 2-3 on generate's manifest rows: boxes, confidence, kept and reason per row.

    Rows the quality gate already rejected keep their reason and get no boxes (nothing is predicted).
    Layout rows keep their requested boxes and get `layout_matched` (module doc, step 3).
    """
    todo = [i for i, r in enumerate(rows) if r.get("kept") is not False]
    images = [Image.open(io.BytesIO(store.read_bytes(store.key_of(rows[i]["uri"])))) for i in todo]
    preds = teacher.predict(images) if images else []
    out = [{**r, "boxes": [], "confidence": None, "label_source": None} for r in rows]
    for i, pred in zip(todo, preds):
        if rows[i].get("label_source") == "layout":
            out[i] = {**rows[i], "confidence": None,
                      "layout_matched": layout_matched(rows[i]["requested_boxes"] or [], pred, min_confidence,
                                                       fidelity_iou)}
            continue
        target = int(rows[i]["class_id"])
        name = names[target] if 0 <= target < len(names) else ""
        verdict = gate_boxes(pred, target, min_confidence, class_consistency, name)
        out[i].update(boxes=verdict.boxes, confidence=verdict.confidence, kept=verdict.kept,
                      reject_reason=verdict.reject_reason or None, label_source="teacher")
    return out


def layout_matched(requested: list[dict], preds: list[PredBox], min_confidence: float, threshold: float) -> int:
    """Requested boxes found by a confident teacher detection of their class with IoU >= threshold."""
    from t2id.lora.location import matched_boxes

    detected = [{"class_id": p.class_id, "x": p.x, "y": p.y, "w": p.w, "h": p.h} for p in preds
                if p.confidence >= min_confidence]
    return matched_boxes(requested, detected, threshold)


def label_fold(store: Store, s: LabelSettings, fold: int, cache_dir: Path, force: bool = False,
               rows: list[dict] | None = None) -> tuple[list[dict], dict]:
    """Steps 1-3 for one fold: the teacher (trained, reused or the grid's) labels `rows` (SYNTHETIC_SCHEMA;
    default: generate's manifest rows of the fold).

    Runs where the teacher's resources are (t2id.label.ray_layer); returns (labelled rows, facts)."""
    lab = s.label
    device = resolve_device(lab.teacher.device, "label.teacher.device")
    weights_key, how = resolve_teacher(store, fold, s, cache_dir, device, force)
    assert s.teacher_detector is not None
    teacher = Teacher(local_weights(store, weights_key, cache_dir), lab.teacher.imgsz or s.teacher_detector.imgsz,
                      device=ultralytics_device(device), iou=lab.teacher.iou, min_confidence=lab.min_confidence)
    if rows is None:
        rows = store.read_table(layout.generate.manifest(fold)).to_pylist()
    labelled = label_with_teacher(store, rows, teacher, load_classes(store), lab.min_confidence,
                                  lab.class_consistency, s.fidelity_iou or 0.5)
    return labelled, {"teacher": weights_key, "teacher_weights": how, "teacher_device": device}

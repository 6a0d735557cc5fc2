"""Teacher pseudo-labels: a detector trained on a fold's real TRAIN images boxes its synthetic images.

  1. Teacher weights per fold (`label.teacher.source`): train one with the detect helper
     (`t2id.detect.train.detect`, strategy `baseline`, the grid's detector settings) on the fold's
     materialized dataset with no synthetic rows. ultralytics needs a val split to pick best.pt; the
     teacher's data yaml points val at the TRAIN images, so the fold's validation images are never
     read. Weights are kept at label/fold=<k>/teacher/best.pt with the identity they were trained
     with, so a rerun reuses them. Or reuse the grid's baseline weights of the fold.
  2. Predict boxes on every kept synthetic image (ultralytics `YOLO(weights).predict`, offline).
  3. Keep boxes with confidence >= label.min_confidence; class-consistency gate: the class the
     image was prompted for must be among them, else the image is rejected with that reason.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from t2id.config import sha256_json
from t2id.data.manifest import CLASSES_KEY, FOLDS_KEY, MANIFEST_KEY
from t2id.detect.config import PRESETS, DetectorConfig
from t2id.errors import UserError
from t2id.store import Store

REJECT_NOT_FOUND = "target class not found"


def teacher_prefix(fold: int) -> str:
    return f"label/fold={fold}/teacher"


def grid_baseline_key(fold: int) -> str:
    return f"grid/fold={fold}/strategy=baseline/best.pt"


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


def teacher_identity(run_store: Store, fold: int, detector: DetectorConfig, seed: int) -> dict:
    """What decides a trained teacher's weights: the fold's real data, the detector settings, the seed."""
    return {"fold": int(fold), "detector": detector.model_dump(mode="json"), "seed": int(seed),
            "strategy": "baseline", "val": "train",
            "inputs": {k: run_store.sha256(k) for k in (MANIFEST_KEY, FOLDS_KEY, CLASSES_KEY)}}


def train_teacher(run_store: Store, fold: int, detector: DetectorConfig, cache_dir: Path, seed: int,
                  device: str = "cpu", workers: int = 0) -> str:
    """Train (or reuse) the fold's teacher; returns the run-relative key of its best.pt."""
    from t2id.data.materialize import materialize_fold
    from t2id.detect.train import detect

    prefix = teacher_prefix(fold)
    identity = teacher_identity(run_store, fold, detector, seed)
    weights_key, identity_key = f"{prefix}/best.pt", f"{prefix}/identity.json"
    if run_store.exists(weights_key) and run_store.exists(identity_key):
        recorded = json.loads(run_store.read_text(identity_key))
        if recorded.get("identity") == identity and recorded.get("sha256") == run_store.sha256(weights_key):
            return weights_key  # trained before with the same data and settings
    fold_data = materialize_fold(run_store, fold, cache_dir, synthetic=None)
    work = Path(cache_dir).expanduser() / "label-teacher" / f"fold{fold}-{sha256_json(identity)[:12]}"
    if work.exists():  # a killed earlier attempt: start clean so ultralytics does not mix runs
        shutil.rmtree(work)
    data_yaml = teacher_data_yaml(fold_data.data_yaml, work)
    result = detect(data_yaml, PRESETS["baseline"], detector, work / "runs", seed, device=device, workers=workers)
    sha = run_store.write_file(weights_key, result.best_weights)
    # Written after the weights: the identity file is the commit point of a finished teacher.
    run_store.write_text(identity_key, json.dumps({"identity": identity, "sha256": sha,
                                                   "train_fit_map50_95": result.overall.get("map50_95")},
                                                  indent=2, default=str))
    return weights_key


def resolve_teacher(run_store: Store, fold: int, source: str, detector: DetectorConfig, cache_dir: Path,
                    seed: int, device: str = "cpu", workers: int = 0) -> str:
    """Run-relative key of the fold's teacher weights for label.teacher.source (train | grid | auto)."""
    grid_key = grid_baseline_key(fold)
    if source in ("grid", "auto") and run_store.exists(grid_key):
        return grid_key
    if source == "grid":
        raise UserError(f"label.teacher.source is 'grid' but {run_store.uri(grid_key)} does not exist: run the "
                        "grid stage with the baseline strategy first, or set label.teacher.source: train")
    return train_teacher(run_store, fold, detector, cache_dir, seed, device, workers)


def local_weights(run_store: Store, key: str, cache_dir: Path) -> Path:
    """The weights file in the local cache, keyed by content (predict needs a local path)."""
    sha = run_store.sha256(key)
    path = Path(cache_dir).expanduser() / "label-teacher" / "weights" / f"{sha[:16]}.pt"
    if not path.exists():
        run_store.read_file(key, path)
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
                       class_consistency: bool) -> list[dict]:
    """Steps 2-3 on generate's manifest rows: boxes, confidence, kept and reason per row.

    Rows the quality gate already rejected keep their reason and get no boxes (nothing is predicted).
    """
    import io

    todo = [i for i, r in enumerate(rows) if r.get("kept") is not False]
    images = [Image.open(io.BytesIO(store.read_bytes(store.key_of(rows[i]["uri"])))) for i in todo]
    preds = teacher.predict(images) if images else []
    out = [{**r, "boxes": [], "confidence": None, "label_source": None} for r in rows]
    for i, pred in zip(todo, preds):
        target = int(rows[i]["class_id"])
        name = names[target] if 0 <= target < len(names) else ""
        verdict = gate_boxes(pred, target, min_confidence, class_consistency, name)
        out[i].update(boxes=verdict.boxes, confidence=verdict.confidence, kept=verdict.kept,
                      reject_reason=verdict.reject_reason or None, label_source="teacher")
    return out

"""The thin Ray layer of `evaluate`: feature extraction as a Ray Data pass.

`FeatureBatch` is the callable class (models loaded once per actor); `extract_with_ray` runs it
over the images that need features, with an actor per GPU when `evaluate.device` gives the
cluster's GPUs to it (t2id.devices.ray_gpus), else one CPU actor. Nothing heavy runs on the driver.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from t2id.evaluate.config import EvaluateConfig
from t2id.store import Store


class FeatureBatch:
    """Ray Data callable: image URIs (+ prompts) -> pool3, IS logits and CLIP score per row.

    Loads the models once per actor. Only rows with `score_clip` (synthetic images) get a CLIP score.
    """

    def __init__(self, store: Store, evaluate: EvaluateConfig, cache_dir: str, device: str,
                 endpoint_url: str | None = None, imgsz: int | None = None) -> None:
        from t2id.evaluate.features import load_inception, resolve_inception

        self.store = store
        self.evaluate = EvaluateConfig.model_validate(evaluate.model_dump())  # re-validated on the worker
        self.device = device
        self.imgsz = imgsz  # grid.detector.imgsz: images are resized to the detector's input first
        self.cache_dir, self.endpoint_url = cache_dir, endpoint_url
        self.inception = load_inception(resolve_inception(self.evaluate.inception_weights, Path(cache_dir),
                                                          endpoint_url), device)
        self._clip = None

    def _clip_scorer(self):
        if self._clip is None:  # only actors that see synthetic rows load CLIP
            from t2id.evaluate.clip_score import ClipScorer

            self._clip = ClipScorer(self.evaluate.clip_weights, self.cache_dir, self.device, self.endpoint_url,
                                    batch_size=self.evaluate.batch_size)
        return self._clip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from t2id.evaluate.features import detector_resize, extract_features

        uris = [str(u) for u in batch["uri"]]
        prompts = [str(p) for p in batch["prompt"]]
        images = []
        for uri in uris:
            with Image.open(io.BytesIO(self.store.read_bytes(self.store.key_of(uri)))) as im:
                images.append(im.convert("RGB") if self.imgsz is None else detector_resize(im, self.imgsz))
        pool3, logits = extract_features(self.inception, images, self.evaluate.batch_size, self.device)
        clip = np.full(len(uris), np.nan)
        with_prompt = [i for i, flag in enumerate(batch["score_clip"]) if flag]
        if with_prompt:
            clip[with_prompt] = self._clip_scorer()([images[i] for i in with_prompt],
                                                    [prompts[i] for i in with_prompt])
        return {"uri": np.array(uris, dtype=object), "pool3": pool3, "logits": logits, "clip": clip}


def extract_with_ray(store: Store, evaluate: EvaluateConfig, items: list[dict[str, Any]], cache_dir: Path,
                     endpoint_url: str | None = None, advance: Callable[[int], None] | None = None,
                     imgsz: int | None = None) -> dict[str, dict[str, Any]]:
    """Run FeatureBatch over `items` ({uri, prompt, score_clip}) with Ray Data (Ray must be up);
    uri -> {pool3, logits, clip}. `advance(1)` is called per finished image."""
    if not items:
        return {}
    import ray

    from t2id.devices import ray_gpus

    gpus = ray_gpus(evaluate.device, "evaluate.device", 1.0)
    actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1
    dataset = ray.data.from_items(items).map_batches(
        FeatureBatch,
        fn_constructor_kwargs=dict(store=store, evaluate=evaluate, cache_dir=str(cache_dir),
                                   device="cuda" if gpus else "cpu", endpoint_url=endpoint_url, imgsz=imgsz),
        batch_size=evaluate.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(items))),
        num_gpus=gpus, num_cpus=1,
    )
    out = {}
    for row in dataset.iter_rows():
        out[row["uri"]] = row
        if advance is not None:
            advance(1)
    return out

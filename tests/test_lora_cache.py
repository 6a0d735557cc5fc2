"""The LoRA latent cache is built streamed: its memory is bounded by a chunk of images, not the dataset."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from t2id.store import open_store

N_IMAGES, SIDE = 200, 128
# Peak RSS growth allowed while building the cache of 200 images at 128 px with hflip. Holding the whole
# dataset's pixels (as the cache did before it was streamed) takes 200 x 2 x 128 x 128 x 3 x 4 B = 79 MB for
# the stacked float32 pixels alone: measured 128 MB growth before, 42 MB streamed (26 MB of it for 24 images
# already: allocator and first-use costs the 8-image warm-up does not reach); one chunk of 8 images is 3 MB,
# the fp16 latents 1.6 MB.
BOUND_MB = 64

PROBE = """
import json, resource, sys
from pathlib import Path
import torch
from t2id.lora.data import ENCODE_CHUNK, Example, build_cache
from t2id.lora.models import load_sdxl_pipeline
from t2id.store import open_store

torch.set_num_threads(1)
store = open_store(sys.argv[1])
examples = [Example(f"img{i:03d}", f"images/{i:03d}.png", "", "vocal fold", "ultrasound of the vocal fold")
            for i in range(int(sys.argv[3]))]
pipe = load_sdxl_pipeline("tiny", Path(sys.argv[2]))
build_cache(pipe, examples[:ENCODE_CHUNK], store.read_bytes, int(sys.argv[4]), hflip=True)  # warm the allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cache = build_cache(pipe, examples, store.read_bytes, int(sys.argv[4]), hflip=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024, "shape": list(cache.latent_mean.shape),
                  "dtype": str(cache.latent_mean.dtype), "finite": bool(torch.isfinite(cache.latent_mean).all())}))
"""


def test_cache_of_200_images_grows_peak_rss_by_a_chunk_not_the_dataset(tmp_path):
    store = open_store(str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(buffer, format="PNG")
        store.write_bytes(f"images/{i:03d}.png", buffer.getvalue())
    # A fresh process: ru_maxrss is its own peak, untouched by what the test session allocated before.
    out = subprocess.run([sys.executable, "-c", PROBE, store.root, str(tmp_path / "cache"), str(N_IMAGES), str(SIDE)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [N_IMAGES, 2, 4, SIDE // 8, SIDE // 8] and result["dtype"] == "torch.float16"
    assert result["finite"]
    assert result["growth_mb"] < BOUND_MB, result

"""Benchmark: our cached LoRA trainer vs a plain loop that re-encodes every step.

Reference = what diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py does per
step: decode + resize + flip + crop the images (its `with_transform`), VAE-encode them
(`latent_dist.sample()`), run both text encoders on the prompts, then the UNet step. Ours =
`t2id.lora.train.fit` on encodings computed once (`t2id.lora.data.build_cache`). Same tiny
SDXL, same phantom images of the target classes, same LoRA config, seed and loss code
(`diffusion_loss`), one process, one thread each. Prints steps/s of both (ours with and without
the one-time cache build) and the final losses side by side.

    .venv/bin/python bench/bench_lora.py [--steps 40] [--resolution 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from t2id.data.phantom import write_phantom
from t2id.lora.config import LoraConfig
from t2id.lora.data import build_cache, encode_prompts, micro_conditioning, preprocess_image
from t2id.lora.models import load_sdxl_pipeline
from t2id.lora.train import diffusion_loss, fit, make_schedule, setup_training, step_batches, step_generator

TARGETS = {2: "High-resolution ultrasound scan of the human tracheal ring",
           5: "High-resolution ultrasound scan of the human vocal fold"}


def phantom_images(folder: Path) -> list[tuple[bytes, str]]:
    """(PNG bytes, prompt) of the phantom images that hold a target class."""
    root = write_phantom(folder, subjects=3, frames_per_subject=10, size=320, seed=0)
    items = []
    for label in sorted((root / "labels").glob("*.txt")):
        classes = {int(line.split()[0]) for line in label.read_text().splitlines() if line.strip()}
        hit = sorted(classes & TARGETS.keys())
        if hit:
            image = next((root / "images").glob(label.stem + ".*"))
            items.append((image.read_bytes(), TARGETS[hit[0]]))
    return items


def reference_loop(pipe, items, cfg: LoraConfig, seed: int) -> tuple[float, list[float]]:
    """Per step: preprocess, VAE-encode and text-encode the batch again (the diffusers script's way)."""
    state = setup_training(pipe, cfg, len(items), seed=seed)
    schedule = make_schedule(len(items), cfg, world=1)
    losses = []
    start = time.perf_counter()
    while state.step < schedule.total_steps:
        (indices,) = step_batches(schedule, state.step, seed, 0)
        gen = step_generator(seed, 0, state.step)
        pixels, time_ids = [], []
        for i in indices:
            image, original, crop = preprocess_image(items[i][0], cfg.resolution)
            if cfg.hflip and torch.rand((), generator=gen) < 0.5:
                image = image[:, ::-1]
            pixels.append(np.ascontiguousarray(image))
            time_ids.append(micro_conditioning(original, crop, (cfg.resolution, cfg.resolution)))
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
        with torch.no_grad():
            latents = pipe.vae.encode(x).latent_dist.sample(gen) * pipe.vae.config.scaling_factor
        embeds, pooled = encode_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                        [items[i][1] for i in indices])
        state.optimizer.zero_grad(set_to_none=True)
        loss = diffusion_loss(state.unet, state.noise_scheduler, latents, embeds, pooled,
                              torch.tensor(time_ids, dtype=torch.float32), gen, cfg.noise_offset, cfg.min_snr_gamma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.params, cfg.max_grad_norm)
        state.optimizer.step()
        state.lr_scheduler.step()
        state.step += 1
        losses.append(loss.item())
    return time.perf_counter() - start, losses


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        items = phantom_images(Path(tmp) / "phantom")
        cache_dir = Path(args.cache_dir)
        steps_per_epoch = len(items) // args.batch_size
        epochs = max(1, -(-args.steps // steps_per_epoch))
        cfg = LoraConfig(rank=4, alpha=4, resolution=args.resolution, batch_size=args.batch_size, lr=1e-3,
                         epochs=epochs, mixed_precision="no", num_workers=1)
        steps = epochs * steps_per_epoch
        print(f"{len(items)} phantom images of the target classes, {steps} steps of batch {args.batch_size} "
              f"at {args.resolution} px, tiny SDXL, 1 thread")

        pipe = load_sdxl_pipeline("tiny", cache_dir)
        t0 = time.perf_counter()
        from t2id.lora.data import Example

        blobs = {f"k{i}": data for i, (data, _) in enumerate(items)}
        examples = [Example(f"i{i}", f"k{i}", "", "", prompt) for i, (_, prompt) in enumerate(items)]
        cache = build_cache(pipe, examples, blobs.__getitem__, args.resolution, hflip=True)
        cache_seconds = time.perf_counter() - t0
        state = setup_training(pipe, cfg, len(cache), seed=args.seed)
        t0 = time.perf_counter()
        fit(state, cache, cfg, seed=args.seed)
        ours_seconds = time.perf_counter() - t0
        ours_losses = [row["loss"] for row in state.log]

        ref_pipe = load_sdxl_pipeline("tiny", cache_dir)
        ref_seconds, ref_losses = reference_loop(ref_pipe, items, cfg, args.seed)

    k = max(1, steps // 5)
    ours_sps, ours_total_sps, ref_sps = steps / ours_seconds, steps / (ours_seconds + cache_seconds), steps / ref_seconds
    print(f"{'':34s}{'steps/s':>10s}{'final loss (mean last ' + str(k) + ')':>30s}")
    print(f"{'reference (re-encode every step)':34s}{ref_sps:10.2f}{np.mean(ref_losses[-k:]):30.4f}")
    print(f"{'t2id cached trainer':34s}{ours_sps:10.2f}{np.mean(ours_losses[-k:]):30.4f}")
    print(f"{'t2id incl. one-time cache build':34s}{ours_total_sps:10.2f}   (cache build {cache_seconds:.2f}s)")
    print(f"speed-up: {ours_sps / ref_sps:.2f}x steady state, {ours_total_sps / ref_sps:.2f}x including the cache "
          f"build (goal >= 1.5x)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "t2id-bench-cache"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

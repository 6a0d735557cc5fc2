"""GPU benchmark: t2id's LoRA trainer, generation and a detector epoch on a full-size SDXL of random weights.

One offline command (nothing is downloaded: the SDXL-1.0 architecture is built from its configs with
random weights, tokenizers from open_clip's BPE file, the data from the phantom), at most ~6 minutes
on one H100/H200:

    .venv/bin/python bench/bench_gpu.py                 # CUDA, full size
    .venv/bin/python bench/bench_gpu.py --tiny          # the same code on CPU with the tiny SDXL (tests)

It prints, and writes as JSON with --json:
  matmul     measured bf16 matmul TFLOP/s (the "measured peak" MFU is also reported against);
  lora       t2id.lora.train.train_step (the trainer's own step on a latent cache, frozen base in the
             training dtype, LoRA rank 16): img/s, steps/s, MFU = 3 x forward FLOPs x img/s / peak, with
             the forward FLOPs counted by torch's FlopCounterMode on this UNet, and peak memory, for 512 px
             batch 16 (fp16, bf16) and 1024 px batch 4 (fp16, bf16);
  generate   512 px, 30 steps, CFG 7.5, with a LoRA adapter: t2id's path (adapter fused, batched, one
             seeded generator per image) at batch 8 and 16, against a plain diffusers call on the same
             pipeline (adapter unfused through PEFT, batch 16) and one image per call;
  detector   one ultralytics training epoch of the grid's detector on the phantom (img/s).
The spec peak defaults to 989 TFLOP/s (dense bf16/fp16 of an H100/H200 SXM); pass --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from t2id.lora.config import LoraConfig
from t2id.lora.data import LatentCache
from t2id.lora.models import SCHEDULER, build_clip_tokenizer, clip_vocab_and_merges, tiny_sdxl_components
from t2id.lora.train import add_unet_lora, make_schedule, save_adapter, setup_training, train_step

# SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0 model_index components), architecture only.
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu", max_position_embeddings=77)


def sdxl_components(device: str) -> dict[str, Any]:
    """SDXL 1.0's seven components with random weights, built on `device` (fast init on a GPU)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = clip_vocab_and_merges()
    ids = dict(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
               pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    with torch.device(device):
        return dict(
            unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**ids, **CLIP_L)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP_BIGG)),
            tokenizer=build_clip_tokenizer("<|endoftext|>"), tokenizer_2=build_clip_tokenizer("!"),
            scheduler=EulerDiscreteScheduler(**SCHEDULER),
        )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_tflops(device: str, n: int, repeats: int) -> float:
    """Measured dense matmul throughput (bf16 on CUDA, fp32 on CPU): the achievable peak."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def unet_forward_flops(unet, resolution: int, device: str, dtype: torch.dtype, text_dim: int, pooled_dim: int) -> float:
    """FLOPs of one image's UNet forward at `resolution` (torch's FlopCounterMode: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    side = resolution // 8
    latents = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    cond = dict(text_embeds=torch.randn(1, pooled_dim, device=device, dtype=dtype),
                time_ids=torch.zeros(1, 6, device=device, dtype=dtype))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(latents, torch.tensor([500], device=device), torch.randn(1, 77, text_dim, device=device, dtype=dtype),
             added_cond_kwargs=cond)
    return float(counter.get_total_flops())


def synthetic_cache(n: int, resolution: int, text_dim: int, pooled_dim: int) -> LatentCache:
    """A latent cache of `n` random encodings: the trainer's input without the (one-off) VAE pass."""
    side = resolution // 8
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 2, 4, side, side, generator=g).half()
    return LatentCache(image_ids=[f"img{i}" for i in range(n)], latent_mean=mean,
                       latent_std=torch.full_like(mean, 0.05),
                       time_ids=torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * n,
                                             dtype=torch.float32),
                       prompt_index=torch.zeros(n, dtype=torch.long), prompts=["bench"],
                       prompt_embeds=torch.randn(1, 77, text_dim, generator=g),
                       pooled_embeds=torch.randn(1, pooled_dim, generator=g))


def bench_lora(components_fn, device: str, resolution: int, batch: int, precision: str, options: dict[str, bool],
               steps: int, warmup: int, peaks: dict[str, float], text_dim: int, pooled_dim: int) -> dict[str, Any]:
    """t2id's train_step on a fresh UNet: img/s, MFU and peak memory at one (resolution, batch, precision,
    lora.channels_last / lora.compile options). With compile, the warm-up steps pay the compilation."""
    from diffusers import StableDiffusionXLPipeline

    reset_peak(device)
    pipe = StableDiffusionXLPipeline(**components_fn())
    cfg = LoraConfig(rank=16, alpha=16, resolution=resolution, batch_size=batch, epochs=1000,
                     mixed_precision=precision, max_grad_norm=1.0, hflip=True, **options)
    cache = synthetic_cache(batch * 4, resolution, text_dim, pooled_dim)
    state = setup_training(pipe, cfg, len(cache), device=device, seed=0)
    schedule = make_schedule(len(cache), cfg, world=1)
    weight_dtype = next(p.dtype for p in pipe.unet.parameters() if not p.requires_grad)
    flops = unet_forward_flops(pipe.unet, resolution, device, weight_dtype, text_dim, pooled_dim)
    for _ in range(warmup + (3 if options.get("compile") else 0)):
        train_step(state, cache, cfg, schedule, seed=0, rank=0)
    sync(device)
    start = time.perf_counter()
    losses = [train_step(state, cache, cfg, schedule, seed=0, rank=0) for _ in range(steps)]
    sync(device)
    seconds = time.perf_counter() - start
    img_s = steps * batch / seconds
    achieved = 3 * flops * img_s / 1e12  # forward + backward ~ 3 x forward (Kaplan et al. 2020 convention)
    out = {"resolution": resolution, "batch": batch, "precision": precision, **options, "img_s": round(img_s, 3),
           "steps_s": round(steps / seconds, 3), "forward_gflop_per_image": round(flops / 1e9, 3),
           "achieved_tflops": round(achieved, 2), "peak_gib": peak_gib(device),
           "frozen_dtype": str(weight_dtype).removeprefix("torch."),
           "loss_finite": all(l == l and abs(l) != float("inf") for l in losses)}
    for name, peak in peaks.items():
        out[f"mfu_vs_{name}"] = round(achieved / peak, 4)
    del pipe, state
    return out


def bench_generate(components_fn, device: str, resolution: int, steps: int, batches: list[int],
                   repeats: int, dtype: torch.dtype, compile: bool = False) -> list[dict[str, Any]]:
    """t2id's generation path (LoRA fused, batched, one seeded generator per image) vs plain diffusers; then
    the same with generate.channels_last, and with generate.compile when asked (its first call compiles)."""
    from t2id.lora.models import speed_up_pipeline

    from diffusers import StableDiffusionXLPipeline

    reset_peak(device)
    pipe = StableDiffusionXLPipeline(**components_fn())
    with tempfile.TemporaryDirectory() as tmp:  # an adapter in diffusers' format, loaded as generate loads it
        add_unet_lora(pipe.unet, LoraConfig(rank=16, alpha=16))
        save_adapter(pipe.unet, tmp)
        pipe = StableDiffusionXLPipeline(**components_fn())
        pipe.to(device, dtype)
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (the pipeline upcasts; force_upcast)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(tmp)
    prompt = "High-resolution ultrasound scan of the human vocal fold"

    def images_per_second(batch: int, calls: int) -> float:
        def call() -> None:
            gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
            pipe(prompt=[prompt] * batch, num_inference_steps=steps, guidance_scale=7.5, height=resolution,
                 width=resolution, generator=gens, output_type="np")

        call()  # warm-up (kernels, allocator)
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        sync(device)
        return batch * calls / (time.perf_counter() - start)

    rows = [{"path": "diffusers, adapter unfused (PEFT)", "batch": batches[-1],
             "img_s": round(images_per_second(batches[-1], repeats), 3)}]
    rows.append({"path": "one image per call, adapter unfused", "batch": 1,
                 "img_s": round(images_per_second(1, repeats), 3)})
    pipe.fuse_lora()
    for batch in batches:
        rows.append({"path": "t2id: adapter fused, batched", "batch": batch,
                     "img_s": round(images_per_second(batch, repeats), 3)})
    speed_up_pipeline(pipe, channels_last=True, compile=False)
    rows.append({"path": "t2id: fused, batched, channels_last", "batch": batches[-1],
                 "img_s": round(images_per_second(batches[-1], repeats), 3)})
    if compile:
        speed_up_pipeline(pipe, channels_last=False, compile=True)
        rows.append({"path": "t2id: fused, batched, channels_last, compiled", "batch": batches[-1],
                     "img_s": round(images_per_second(batches[-1], repeats), 3)})
    for row in rows:
        row.update(resolution=resolution, steps=steps, guidance=7.5, peak_gib=peak_gib(device))
    return rows


def bench_detector(device: str, model: str, imgsz: int, subjects: int, frames: int, batch: int) -> dict[str, Any]:
    """One training epoch of the grid's detector (t2id.detect.train.detect, baseline) on the phantom."""
    from t2id.data.phantom import write_phantom
    from t2id.detect.config import PRESETS, DetectorConfig
    from t2id.detect.train import detect

    with tempfile.TemporaryDirectory() as tmp:
        root = write_phantom(Path(tmp) / "phantom", subjects=subjects, frames_per_subject=frames, size=imgsz, seed=0)
        images = len(list((root / "images").glob("*")))
        detector = DetectorConfig(model=model, imgsz=imgsz, epochs=1, batch=batch, nominal_batch=batch,
                                  warmup_epochs=0, validate_every_epoch=False)
        start = time.perf_counter()
        result = detect(root / "data.yaml", PRESETS["baseline"], detector, Path(tmp) / "out", seed=0,
                        device="0" if device == "cuda" else "cpu")
        seconds = time.perf_counter() - start
    return {"model": model, "imgsz": imgsz, "images": images, "epoch_with_final_val_s": round(seconds, 2),
            "img_s": round(images / seconds, 2), "optimizer_steps": result.optimizer_steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="The tiny SDXL on CPU, tiny sizes (what the tests run).")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="Spec dense bf16/fp16 peak (H100/H200: 989).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--compile", action="store_true",
                        help="Also time lora.compile and generate.compile (adds their compilation, minutes).")
    args = parser.parse_args(argv)

    if args.tiny:
        device, components_fn = "cpu", tiny_sdxl_components
        lora_runs, steps, warmup = [(64, 4, "no", {}), (64, 4, "bf16", {}), (64, 4, "no", {"channels_last": True})], 2, 1
        gen = dict(resolution=64, steps=2, batches=[1, 2], repeats=1, dtype=torch.float32)
        det = dict(model="yolov8n.yaml", imgsz=64, subjects=2, frames=4, batch=4)
        text_dim, pooled_dim, matmul = 64, 32, dict(n=256, repeats=5)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs CUDA; run with --tiny for the CPU version")
        device = "cuda"
        cached: dict[str, Any] = {}

        def components_fn() -> dict[str, Any]:  # built once on the GPU, then copied per run
            import copy

            if "c" not in cached:
                cached["c"] = sdxl_components("cuda")
            return {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in cached["c"].items()}

        lora_runs = [(512, 16, "fp16", {}), (512, 16, "bf16", {}), (512, 16, "bf16", {"channels_last": True}),
                     (1024, 4, "fp16", {}), (1024, 4, "bf16", {})]
        if args.compile:
            lora_runs.append((512, 16, "bf16", {"channels_last": True, "compile": True}))
        steps, warmup = 10, 3
        gen = dict(resolution=512, steps=30, batches=[8, 16], repeats=2, dtype=torch.float16)
        det = dict(model="yolov9s.yaml", imgsz=320, subjects=20, frames=20, batch=64)
        text_dim, pooled_dim, matmul = 2048, 1280, dict(n=8192, repeats=50)

    t0 = time.perf_counter()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "torch": torch.__version__, "tiny": args.tiny}
    measured = matmul_tflops(device, **matmul)
    results["matmul_tflops"] = float(f"{measured:.4g}")  # 4 significant digits: a loaded CPU measures ~0.001
    peaks = {"spec": args.peak_tflops, "measured_matmul": measured}
    print(f"device {results['device']}; matmul {measured:.1f} TFLOP/s measured, spec peak {args.peak_tflops:g}")
    results["lora"] = []
    for resolution, batch, precision, options in lora_runs:
        row = bench_lora(components_fn, device, resolution, batch, precision, options, steps, warmup, peaks, text_dim,
                         pooled_dim)
        results["lora"].append(row)
        label = "".join(f", {name}" for name, on in options.items() if on)
        print(f"lora {resolution}px b{batch} {precision}{label}: {row['img_s']} img/s, MFU {row['mfu_vs_spec']:.1%} of spec "
              f"({row['mfu_vs_measured_matmul']:.1%} of measured matmul), peak {row['peak_gib']} GiB, frozen "
              f"{row['frozen_dtype']}")
    results["generate"] = bench_generate(components_fn, device, **gen, compile=args.compile and not args.tiny)
    for row in results["generate"]:
        print(f"generate {row['resolution']}px {row['steps']} steps CFG 7.5, {row['path']}, batch {row['batch']}: "
              f"{row['img_s']} img/s")
    results["detector"] = bench_detector(device, **det)
    d = results["detector"]
    print(f"detector {d['model']} {d['imgsz']}px: one epoch of {d['images']} images + final validation in "
          f"{d['epoch_with_final_val_s']} s ({d['img_s']} img/s)")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"total {results['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

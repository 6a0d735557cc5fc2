"""Ray Train layer of the LoRA trainer: `train_func` per worker, `train_fold` on the driver.

The loop itself is `t2id.lora.train.fit`; this module adds what needs Ray:
  - DDP: `ray.train.torch.prepare_model` wraps the UNet (gloo on CPU, NCCL on GPU); each rank
    takes its disjoint slice of every step's global batch (train.step_batches). With
    lora.train_text_encoder the text encoders' LoRA gradients are all-reduced explicitly each step
    (train.all_reduce_text_encoder_grads) rather than through a DDP wrapper: text_encoder's last
    layer feeds nothing SDXL uses, so its LoRA gets no gradient, which a plain DDP wrapper rejects.
  - Checkpoints every `checkpoint_every_steps` steps via `ray.train.report(checkpoint=...)` into
    Ray Train storage = `<run store>/lora/_ray/` (local folder or S3 through a pyarrow
    S3FileSystem with the store's endpoint). A checkpoint holds the LoRA weights (UNet and, when
    trained, both text encoders), optimizer,
    LR scheduler, grad scaler, step and the training log; the RNG state is a function of the
    step (train module doc), so restoring the step restores it.
  - FailureConfig(max_failures): when a worker dies, Ray Train restarts the worker group and
    `train_func` resumes from `ray.train.get_checkpoint()`. A rerun of the stage with the same
    inputs uses the same run name and storage path, so Ray Train restores the run's checkpoint
    state from storage and resumes as well.
Outputs (rank 0, written to the run store at the end): the adapter, the training log, and
validation images after epochs; every rank also writes which examples it processed and the
digest of its final adapter weights (`ranks/rank=<r>.json`), so DDP agreement is checkable.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from t2id.lora.config import LoraConfig
from t2id.lora.data import Example, load_or_build_cache
from t2id.lora.models import resolve_model_source
from t2id.lora.train import (
    ADAPTER_FILE,
    Hooks,
    TrainState,
    fit,
    load_lora_state_dict,
    lora_digest,
    lora_state_dict,
    make_schedule,
    save_adapter,
    setup_training,
    unwrap,
)
from t2id.store import LocalStore, S3Store, Store

LOG_SCHEMA = pa.schema([
    pa.field("step", pa.int64()),  # optimizer steps done (1-based)
    pa.field("epoch", pa.int32()),
    pa.field("loss", pa.float64()),  # mean over ranks of the step's micro-batch losses
    pa.field("lr", pa.float64()),
    pa.field("time", pa.float64()),  # seconds of training so far (summed over attempts)
])


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# Checkpoint files -------------------------------------------------------------------------------

TEXT_ENCODER_FILES = ("lora_text_encoder.safetensors", "lora_text_encoder_2.safetensors")


def save_checkpoint(state: TrainState, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(lora_state_dict(state.unet), str(folder / "lora.safetensors"))
    for i, encoder in enumerate(state.text_encoders):
        save_file(lora_state_dict(encoder), str(folder / TEXT_ENCODER_FILES[i]))
    torch.save({
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.lr_scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler else None,
        "step": state.step,
        "log": state.log,
    }, folder / "trainer.pt")


def restore_checkpoint(state: TrainState, folder: Path) -> None:
    from safetensors.torch import load_file

    load_lora_state_dict(state.unet, load_file(str(folder / "lora.safetensors"), device=str(state.device)))
    for i, encoder in enumerate(state.text_encoders):
        path = folder / TEXT_ENCODER_FILES[i]
        if not path.exists():
            raise RuntimeError(f"checkpoint {folder} has no {TEXT_ENCODER_FILES[i]}, but lora.train_text_encoder "
                               "is on; it was written by a run without text-encoder LoRA")
        load_lora_state_dict(encoder, load_file(str(path), device=str(state.device)))
    saved = torch.load(folder / "trainer.pt", map_location=state.device, weights_only=False)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if state.scaler and saved["scaler"]:
        state.scaler.load_state_dict(saved["scaler"])
    state.step = int(saved["step"])
    state.log = list(saved["log"])


# Worker ---------------------------------------------------------------------------------------


def write_validation_images(pipe, state: TrainState, cfg: LoraConfig, store: Store, prefix: str, epoch: int,
                            seed: int) -> list[str]:
    """`validation_images` images per target class with fixed seeds, so epochs are comparable."""
    keys = []
    unet = unwrap(state.unet)
    unet.eval()
    for encoder in state.text_encoders:
        encoder.eval()
    try:
        for c, target in enumerate(cfg.target_classes):
            for i in range(cfg.validation_images):
                gen = torch.Generator().manual_seed(seed + 1000 * c + i)
                with torch.no_grad(), state.autocast():
                    image = pipe(target.prompts[i % len(target.prompts)], num_inference_steps=cfg.validation_steps,
                                 height=cfg.resolution, width=cfg.resolution, generator=gen).images[0]
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                key = f"{prefix}/validation/epoch={epoch:04d}/{slug(target.name)}-{i}.png"
                store.write_bytes(key, buffer.getvalue())
                keys.append(key)
    finally:
        unet.train()
        for encoder in state.text_encoders:
            encoder.train()
    return keys


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: load model, cache encodings, (resume,) train, write outputs."""
    import ray.train
    import ray.train.torch
    from diffusers import StableDiffusionXLPipeline

    cfg = LoraConfig.model_validate(config["lora"])
    store: Store = config["store"]
    prefix: str = config["prefix"]
    seed: int = config["seed"]
    examples: list[Example] = config["examples"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray sets OMP_NUM_THREADS to the worker's CPUs; torch must follow or it oversubscribes cores.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()

    # 1. Model and frozen encodings (cached on local disk: a restarted worker skips this).
    model_dir = resolve_model_source(cfg.base_model, Path(config["cache_dir"]), cfg.allow_network,
                                     endpoint_url=getattr(store, "endpoint_url", None))
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    cache = load_or_build_cache(Path(config["cache_dir"]), model_dir, pipe, examples, store.read_bytes,
                                cfg.resolution, cfg.hflip, cfg.vae_fp32, device)

    # 2. Adapter, optimizer, schedules; resume from the last checkpoint when there is one.
    state = setup_training(pipe, cfg, len(cache), world, device, seed)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restore_checkpoint(state, Path(folder))
    resumed_from = state.step
    if world > 1:
        state.unet = ray.train.torch.prepare_model(pipe.unet, move_to_device=False)
    schedule = make_schedule(len(cache), cfg, world)

    # 3. Hooks: checkpoint + report every K steps, validation images after epochs, fault injection.
    fault = config.get("fault") or {}

    def after_step(state: TrainState, row: dict[str, Any]) -> None:
        if fault and rank == fault["rank"] and state.step == fault["step"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text("killed")
            # Ray Train's controller collects reports when it polls the workers (every 2 s); a crash
            # right after a report can lose it. Real crashes come long after; the delay models that.
            time.sleep(fault.get("delay_s", 0))
            os._exit(1)  # a worker dying mid-run, as a preempted node would
        last = state.step == schedule.total_steps
        if state.step % cfg.checkpoint_every_steps and not last:
            return
        metrics = {"step": state.step, "loss": row["loss"]}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(state, Path(tmp))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def after_epoch(state: TrainState, epoch: int) -> None:
        last = state.step == schedule.total_steps
        if rank == 0 and cfg.validation_images and ((epoch + 1) % cfg.validation_every_epochs == 0 or last):
            write_validation_images(pipe, state, cfg, store, prefix, epoch, seed)

    fit(state, cache, cfg, seed, rank, world, Hooks(after_step=after_step, after_epoch=after_epoch))

    # 4. Outputs.
    record = {
        "rank": rank, "world": world, "resumed_from_step": resumed_from, "lora_digest": lora_digest(state.unet, *state.text_encoders),
        "steps": [[step, [cache.image_ids[i] for i in idx]] for step, idx in state.seen],
    }
    store.write_text(f"{prefix}/ranks/rank={rank}.json", json.dumps(record))
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(state.unet, tmp, state.text_encoders)
            store.write_file(f"{prefix}/{ADAPTER_FILE}", Path(tmp) / ADAPTER_FILE)
        store.write_table(f"{prefix}/train_log.parquet", pa.Table.from_pylist(state.log, schema=LOG_SCHEMA))


# Driver ---------------------------------------------------------------------------------------


def ray_storage(store: Store, key: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) of Ray Train for a folder of the run store."""
    if isinstance(store, LocalStore):
        return str(Path(store.uri(key)).resolve()), None
    if isinstance(store, S3Store):
        from pyarrow import fs

        kwargs: dict[str, Any] = {}
        if store.endpoint_url:
            scheme, _, host = store.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        if store.region:
            kwargs["region"] = store.region
        return store.uri(key).removeprefix("s3://"), fs.S3FileSystem(**kwargs)
    raise TypeError(f"unsupported store {type(store).__name__}")


def train_fold(store: Store, prefix: str, examples: list[Example], cfg: LoraConfig, seed: int, cache_dir: Path,
               run_name: str, fault: dict[str, Any] | None = None):
    """Train one adapter with Ray Train (Ray must be initialized); outputs land under `prefix`.

    `fault` ({"rank", "step", "marker", "delay_s"}) kills that rank once after that step (if the marker
    file does not exist yet; it is created first): for tests of recovery.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.base_model == "tiny":  # build it once here rather than racing in every worker
        resolve_model_source("tiny", cache_dir)
    storage_path, filesystem = ray_storage(store, "lora/_ray")
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"lora": cfg.model_dump(mode="json"), "store": store, "prefix": prefix, "seed": seed,
                           "examples": examples, "cache_dir": str(Path(cache_dir).resolve()), "fault": fault},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    return trainer.fit()

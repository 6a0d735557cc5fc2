"""Ray Train layer of the LoRA trainer: `train_func` per worker, `train_fold` on the driver.

The loop itself is `t2id.lora.train.fit`; this module adds what needs Ray:
  - DDP: `ray.train.torch.prepare_model` wraps the UNet (gloo on CPU, NCCL on GPU); each rank
    takes its disjoint slice of every step's global batch (train.step_batches). With
    lora.train_text_encoder the text encoders' LoRA gradients are all-reduced explicitly each step
    (train.all_reduce_text_encoder_grads) rather than through a DDP wrapper: text_encoder's last
    layer feeds nothing SDXL uses, so its LoRA gets no gradient, which a plain DDP wrapper rejects.
  - Checkpoints every lora.checkpoint_every_steps steps via `ray.train.report(checkpoint=...)` into
    Ray Train storage = `layout.lora.ray_run(run_name)` of the run store (a local folder, or S3
    through the store's pyarrow filesystem: t2id.store.ray_storage). A checkpoint is
    train.save_checkpoint's folder (LoRA weights, optimizer, LR scheduler, grad scaler, step, log).
  - FailureConfig(lora.max_failures): when a worker dies, Ray Train restarts the worker group and
    `train_func` resumes from `ray.train.get_checkpoint()`. A rerun of the stage with the same
    inputs uses the same run name and storage path, so Ray Train restores the run's checkpoint
    state from storage and resumes as well. A UserError in a worker is not retried
    (`no_retry_of_user_errors`): fit() fails at once with it.
Outputs (rank 0, written to the run store at the end): the adapter, the training log, and
validation images after epochs; every rank also writes which examples it processed and the
digest of its final adapter weights (`layout.lora.rank(fold, r)`), so DDP agreement is checkable.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from t2id import layout
from t2id.lora.config import LoraConfig
from t2id.lora.data import Example, SharedCache, load_or_build_cache
from t2id.lora.models import TINY, resolve_model_source
from t2id.lora.textual_inversion import add_tokens, expand_prompt
from t2id.lora.train import (
    Hooks,
    TrainState,
    fit,
    lora_digest,
    make_schedule,
    restore_checkpoint,
    save_adapter,
    save_checkpoint,
    setup_training,
    unwrap,
)
from t2id.store import Store, ray_storage
from t2id.tracking import Tracking, lora_run

LOG_SCHEMA = pa.schema([
    pa.field("step", pa.int64()),  # optimizer steps done (1-based)
    pa.field("epoch", pa.int32()),
    pa.field("loss", pa.float64()),  # mean over ranks of the step's micro-batch losses
    pa.field("lr", pa.float64()),
    pa.field("time", pa.float64()),  # seconds of training so far (summed over attempts)
])
# lora.method dreambooth_lora: loss = instance_loss + prior_loss_weight x prior_loss, both terms logged.
DREAMBOOTH_LOG_SCHEMA = LOG_SCHEMA.append(pa.field("instance_loss", pa.float64())).append(
    pa.field("prior_loss", pa.float64()))


def log_schema(cfg: LoraConfig) -> pa.Schema:
    return DREAMBOOTH_LOG_SCHEMA if cfg.method == "dreambooth_lora" else LOG_SCHEMA


def write_validation_images(pipe, state: TrainState, cfg: LoraConfig, store: Store, fold: int, epoch: int,
                            seed: int, prompts: dict[str, list[str]] | None = None) -> list[str]:
    """`validation_images` images per target class with fixed seeds, so epochs are comparable; `prompts`:
    each class's prompts as the method trains them (default: lora.target_classes' prompts)."""
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
                    texts = (prompts or {}).get(target.name) or target.prompts
                    image = pipe(texts[i % len(texts)], num_inference_steps=cfg.validation_steps,
                                 height=cfg.resolution, width=cfg.resolution, generator=gen).images[0]
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                key = layout.lora.validation(fold, epoch, target.name, i)
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

    cfg: LoraConfig = config["lora"]  # the stage's settings section, pickled as is
    store: Store = config["store"]
    fold: int = config["fold"]
    seed: int = config["seed"]
    examples: list[Example] = config["examples"]
    prior_examples: list[Example] | None = config.get("prior_examples")  # dreambooth_lora's class-prior images
    cache_dir = Path(config["cache_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray sets OMP_NUM_THREADS to the worker's CPUs; torch must follow or it oversubscribes cores.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()

    # 1. Model and frozen encodings (cached on local disk: a restarted worker skips this).
    model_dir = resolve_model_source(cfg.base_model, cache_dir, cfg.allow_network, config["endpoint_url"])
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    token_set = None
    prompts = config.get("prompts")  # class -> prompts as the method trains them (validation images)
    if cfg.method == "textual_inversion":  # the pseudo-words must be in the tokenizers before prompts are cached
        token_set = add_tokens(pipe, cfg.textual_inversion, [t.name for t in cfg.target_classes])
        examples = [replace(e, prompt=expand_prompt(e.prompt, token_set.tokens)) for e in examples]
        prompts = {name: [expand_prompt(p, token_set.tokens) for p in texts] for name, texts in (prompts or {}).items()}
    extra_tokens = tuple(token_set.flat) if token_set else ()
    # Encoded once over all ranks (each its share) and shared through the store (issue 17, item 5).
    shared = SharedCache(store, fold, cache_dir, model_dir, pipe, examples, cfg.resolution, cfg.hflip,
                         cfg.vae_fp32, device, rank, world, extra_tokens)
    shared.put_shard()
    if world > 1:
        torch.distributed.barrier()  # every shard is in the store
    cache = shared.assemble()

    # 2. Adapter, optimizer, schedules; resume from the last checkpoint when there is one.
    state = setup_training(pipe, cfg, len(cache), world, device, seed, token_set)
    if prior_examples:
        state.prior_cache = load_or_build_cache(cache_dir, model_dir, pipe, prior_examples, store.read_bytes,
                                                cfg.resolution, cfg.hflip, cfg.vae_fp32, device)
        by_class: dict[str, list[int]] = {}
        for i, e in enumerate(prior_examples):
            by_class.setdefault(e.class_name, []).append(i)
        state.prior_of = [by_class[e.class_name] for e in examples]
        state.prior_loss_weight = cfg.dreambooth.prior_loss_weight
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restore_checkpoint(state, Path(folder))
    resumed_from = state.step
    if world > 1 and token_set is None:  # textual inversion: a frozen UNet; embedding grads are all-reduced
        state.unet = ray.train.torch.prepare_model(pipe.unet, move_to_device=False)
    schedule = make_schedule(len(cache), cfg, world)

    # 3. Hooks: checkpoint + report every K steps (and after the last), validation images after epochs.
    def after_step(state: TrainState, row: dict[str, Any]) -> None:
        if rank == 0 and config.get("progress") is not None:  # the driver's progress bar (fire and forget)
            config["progress"].set.remote(f"fold={fold}", state.step)
        log.log({"loss": row["loss"], "lr": row["lr"]}, step=state.step)  # `log`: the fold's run, opened below
        last = state.step == schedule.total_steps
        if state.step % cfg.checkpoint_every_steps and not last:
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(state, Path(tmp))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"step": state.step, "loss": row["loss"]}, checkpoint=ckpt)

    def after_epoch(state: TrainState, epoch: int) -> None:
        last = state.step == schedule.total_steps
        if rank == 0 and cfg.validation_images and ((epoch + 1) % cfg.validation_every_epochs == 0 or last):
            write_validation_images(pipe, state, cfg, store, fold, epoch, seed, prompts)

    # run.tracking: rank 0 logs the fold's loss curve to MLflow / TensorBoard; the other ranks get a no-op log.
    with lora_run(config.get("tracking") if rank == 0 else None, store, fold, seed, resumed_from) as log:
        fit(state, cache, cfg, seed, rank, world, Hooks(after_step=after_step, after_epoch=after_epoch))

    # 4. Outputs.
    record = {
        "rank": rank, "world": world, "resumed_from_step": resumed_from, "examples_encoded": shared.encoded,
        "lora_digest": state.guard.digest() if state.guard else lora_digest(state.unet, *state.text_encoders),
        "steps": [[step, [cache.image_ids[i] for i in idx]] for step, idx in state.seen],
    }
    store.write_text(layout.lora.rank(fold, rank), json.dumps(record))
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            if state.guard is not None:  # textual inversion: the learnt rows, diffusers' SDXL format
                from safetensors.torch import save_file

                save_file(state.guard.rows(), str(Path(tmp) / "embeds.safetensors"))
                store.write_file(layout.lora.embeddings(fold), Path(tmp) / "embeds.safetensors")
                store.write_text(layout.lora.tokens(fold), json.dumps({"tokens": token_set.tokens,
                                                                       "init_word": cfg.textual_inversion.init_word}))
            else:
                save_adapter(state.unet, tmp, state.text_encoders)
                store.write_file(layout.lora.adapter(fold), Path(tmp) / layout.lora.adapter_file)
        store.write_table(layout.lora.train_log(fold), pa.Table.from_pylist(state.log, schema=log_schema(cfg)))


def train_fold(store: Store, fold: int, examples: list[Example], cfg: LoraConfig, seed: int, cache_dir: Path,
               run_name: str, endpoint_url: str | None = None, progress: Any = None,
               tracking: Tracking | None = None, prior_examples: list[Example] | None = None,
               prompts: dict[str, list[str]] | None = None):
    """Train fold `fold`'s adapter with Ray Train (Ray must be initialized); outputs land under
    layout.lora.fold(fold), checkpoints under layout.lora.ray_run(run_name). Returns Ray's Result.
    `progress`: a t2id.raycluster.progress_relay handle that rank 0 tells its optimizer step.
    `prior_examples`: dreambooth_lora's class-prior images; `prompts`: class -> its prompts as the method
    trains them (validation images)."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    if cfg.base_model == TINY:  # build it once here rather than racing in every worker
        resolve_model_source(TINY, cache_dir)
    return fit_on_ray_train(
        train_func, {"lora": cfg, "store": store, "fold": fold, "seed": seed, "examples": examples,
                     "cache_dir": str(cache_dir), "endpoint_url": endpoint_url, "progress": progress,
                     "tracking": tracking, "prior_examples": prior_examples, "prompts": prompts},
        cfg, store, run_name)


def fit_on_ray_train(func: Any, loop_config: dict[str, Any], cfg: LoraConfig, store: Store, run_name: str):
    """Run `func` on Ray Train with the lora section's conventions: lora.num_workers DDP workers, checkpoints
    under layout.lora.ray_run(run_name) (kept: lora.keep_checkpoints), lora.max_failures restarts, no retry of
    a UserError. Returns Ray's Result. (Also the trainer of lora.method ddpm, t2id.lora.ddpm.)"""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = ray_storage(store, layout.lora.ray_storage)
    trainer = TorchTrainer(
        func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=[no_retry_of_user_errors()],
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    return trainer.fit()


def no_retry_of_user_errors() -> Any:
    """A Ray Train callback that ends a run at a worker's UserError instead of retrying it.

    Ray Train's failure policy restarts the worker group after any worker error, lora.max_failures times, and
    each restart reloads the model: a missing base model took minutes of identical failures. A bad input fails
    the same way every time. The callback runs on the Train controller after the workers' errors are polled;
    what it raises is a controller error, which the policy does not retry, so fit() raises at once a
    ControllerError holding the UserError (t2id.errors.one_line prints it as one line). Worker deaths and
    other errors are still retried."""
    from ray.train import UserCallback

    from t2id.errors import UserError

    class NoRetryOfUserErrors(UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            for rank in sorted(worker_exceptions):
                if isinstance(worker_exceptions[rank], UserError):
                    raise worker_exceptions[rank]

    return NoRetryOfUserErrors()

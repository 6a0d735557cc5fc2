"""lora.method ddpm: one unconditional DDPM per fold and target class, trained from scratch on Ray Train.

The lung-ultrasound study (papers/lung-ultrasound-textual-inversion-ddpm.txt, Sec. 3.4 and 4.4) trained
diffusers' unconditional image generation pipeline, a UNet2DModel denoiser with a DDPM noise scheduler,
on the images of one class, and sampled it. t2id does that per fold: for each target class, a UNet2DModel
from scratch on the fold's TRAIN images of that class only (t2id.lora.stage.fold_examples: never a
validation image), resized to lora.ddpm.resolution (shorter side + centre crop, as the lora stage).

  - Objective: Ho et al. 2020 (arXiv 2006.11239) eq. 14: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with t
    uniform in [0, T), loss = ||eps - eps_theta(x_t, t)||^2; AdamW, warmup + cosine LR, gradient norm
    clipped at 1 and an EMA of the weights (the ones written and sampled) as diffusers' train_unconditional.py.
  - Ray Train: one run per fold, its classes in turn, with the lora stage's conventions (t2id.lora.ray_layer.fit_on_ray_train:
    lora.num_workers DDP workers, gloo on CPU; checkpoints every lora.checkpoint_every_steps; FailureConfig;
    a UserError is not retried). Batches and random draws reuse t2id.lora.train's schedule: ranks take
    disjoint slices of each step's global batch, every draw comes from (seed, rank, step), so a resumed run
    takes the same steps as one that never stopped.
  - Outputs under layout.lora.ddpm_class(fold, class): config.json + diffusion_pytorch_model.safetensors
    (UNet2DModel.from_pretrained) + scheduler_config.json (DDPMScheduler.from_pretrained) + train_log.parquet;
    ranks/<class>/rank=<r>.json (examples each rank used, its final weights digest); then the fold's
    train_log.parquet (every class, a `class` column), train_ids.json (method, image ids per class, seeds,
    weights sha256) and ddpm/models.json, the fold's generator index (t2id.generate.ddpm_worker).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from t2id import layout
from t2id.errors import UserError
from t2id.lora.config import LoraConfig, TargetClass
from t2id.lora.data import Example, preprocess_image
from t2id.lora.methods import DdpmConfig
from t2id.lora.ray_layer import LOG_SCHEMA
from t2id.lora.train import (
    Schedule,
    draw_noise,
    make_lr_scheduler,
    make_schedule,
    mean_over_ranks,
    per_image_loss,
    step_batches,
    step_generator,
    unwrap,
)
from t2id.store import Store

if TYPE_CHECKING:
    from t2id.events import Advance
    from t2id.lora.settings import LoraSettings
    from t2id.resume import Memo
    from t2id.runner import StageContext

# diffusers' train_unconditional.py clips the gradient norm at 1.0 (accelerator.clip_grad_norm_(..., 1.0)).
MAX_GRAD_NORM = 1.0
CLASS_LOG_SCHEMA = LOG_SCHEMA.append(pa.field("class", pa.string()))

# The lora section's fields that ddpm reads; the others (SDXL, LoRA, text) are reset to their defaults in
# its settings and fold identity, so changing them re-trains nothing (ddpm_view).
USED_FIELDS = ("method", "ddpm", "seed", "checkpoint_every_steps", "keep_checkpoints", "max_failures", "folds",
               "num_workers", "use_gpu", "cpus_per_worker")


def ddpm_view(cfg: LoraConfig) -> LoraConfig:
    """The lora section as ddpm sees it: its used fields, the class names (prompts = the name: no text
    conditioning), every SDXL/LoRA setting at its default."""
    return LoraConfig(**{name: getattr(cfg, name) for name in USED_FIELDS},
                      target_classes=[TargetClass(name=t.name, prompts=[t.name]) for t in cfg.target_classes])


def class_seed(fold_seed: int, class_name: str) -> int:
    """The seed of a class's model (init, data order, noise): from the fold's seed and the class."""
    return int.from_bytes(hashlib.sha256(f"ddpm/{fold_seed}/{class_name}".encode()).digest()[:4], "little")


def class_examples(examples: list[Example]) -> dict[str, list[Example]]:
    """The fold's training examples by class (each image counts for the class it was selected for)."""
    out: dict[str, list[Example]] = {}
    for e in examples:
        out.setdefault(e.class_name, []).append(e)
    return out


def schedule(n: int, d: DdpmConfig, world: int) -> Schedule:
    """Steps of a class's training: t2id.lora.train.make_schedule over lora.ddpm's batch/accum/epochs."""
    return make_schedule(n, d, world)  # type: ignore[arg-type]  # reads batch_size, grad_accum, epochs


def fold_steps(cfg: LoraConfig, examples: list[Example]) -> int | None:
    """Optimizer steps of a fold, all classes (None when a class cannot fill a batch: training says why)."""
    assert cfg.ddpm is not None
    try:
        return sum(schedule(len(part), cfg.ddpm, cfg.num_workers).total_steps
                   for part in class_examples(examples).values())
    except ValueError:
        return None


# Model ----------------------------------------------------------------------------------------


def build_unet(d: DdpmConfig):
    """diffusers' example UNet2DModel, sized by lora.ddpm: self-attention at the second-lowest resolution
    (AttnDownBlock2D / AttnUpBlock2D there, plain blocks elsewhere)."""
    import math

    from diffusers import UNet2DModel

    levels = len(d.block_out_channels)
    down = ["DownBlock2D"] * levels
    if levels >= 2:
        down[levels - 2] = "AttnDownBlock2D"
    up = ["AttnUpBlock2D" if t == "AttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
    channels = 1 if d.grayscale else 3
    return UNet2DModel(sample_size=d.resolution, in_channels=channels, out_channels=channels,
                       layers_per_block=d.layers_per_block, block_out_channels=tuple(d.block_out_channels),
                       down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=math.gcd(32, *d.block_out_channels))


def noise_scheduler(d: DdpmConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=d.train_timesteps, beta_schedule=d.beta_schedule)


def weights_digest(unet: torch.nn.Module) -> str:
    """sha256 over the model's parameters (DDP ranks must agree)."""
    digest = hashlib.sha256()
    for key, value in sorted(unwrap(unet).state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_pixels(store: Store, examples: list[Example], d: DdpmConfig) -> torch.Tensor:
    """(N, C, R, R) float32 in [-1, 1]: each image resized (shorter side) and centre-cropped to the resolution;
    grey = ITU-R 601 luma of the RGB decode (PIL's "L" weights) when lora.ddpm.grayscale."""
    rows = []
    for e in examples:
        pixels, _, _ = preprocess_image(store.read_bytes(e.key), d.resolution)  # HxWx3 in [-1, 1]
        image = torch.from_numpy(pixels).permute(2, 0, 1)
        if d.grayscale:
            image = (image * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        rows.append(image)
    return torch.stack(rows).contiguous()


# Training -------------------------------------------------------------------------------------


def train_step(model, scheduler, optimizer, lr_scheduler, pixels: torch.Tensor, sched: Schedule, d: DdpmConfig,
               seed: int, rank: int, step: int, device: torch.device) -> tuple[float, list[int]]:
    """One optimizer step over lora.ddpm.grad_accum micro-batches (DDP syncs on the last); (loss, examples)."""
    import contextlib

    micro_batches = step_batches(sched, step, seed, rank)
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for i, indices in enumerate(micro_batches):
        gen = step_generator(seed, rank, step, i)
        x0 = pixels[torch.tensor(indices, dtype=torch.long)]
        if d.hflip:
            flip = torch.rand(len(indices), generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = draw_noise(x0, gen, 0.0)
        t = torch.randint(0, d.train_timesteps, (len(indices),), generator=gen)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        noisy = scheduler.add_noise(x0, noise, t)  # Ho et al. eq. 4 (closed-form q(x_t | x_0))
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            pred = model(noisy, t).sample
            loss = per_image_loss(pred, noise, scheduler, t, None).mean()  # eq. 14: epsilon MSE
            (loss / len(micro_batches)).backward()
        losses.append(loss.detach().float().item())
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    lr_scheduler.step()
    return sum(losses) / len(losses), [i for micro in micro_batches for i in micro]


def make_ema(unet, d: DdpmConfig):
    """diffusers' EMAModel as train_unconditional.py builds it (warmup decay; lora.ddpm.ema_*), or None."""
    if not d.ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=d.ema_max_decay, use_ema_warmup=True, inv_gamma=d.ema_inv_gamma,
                    power=d.ema_power)


def save_checkpoint(folder: Path, model, optimizer, lr_scheduler, progress: dict[str, Any]) -> None:
    """The class in training (its UNet, optimizer, LR scheduler) and `progress`: {class, step, log, done}, where
    done = {class: weights sha256} of the classes finished and written to the store before it."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()},
              str(folder / "unet.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), **progress},
               folder / "trainer.pt")


def restore_checkpoint(folder: Path, model, optimizer, lr_scheduler, device: torch.device) -> dict[str, Any]:
    from safetensors.torch import load_file

    unwrap(model).load_state_dict(load_file(str(folder / "unet.safetensors"), device=str(device)))
    saved = torch.load(folder / "trainer.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(saved.pop("optimizer"))
    lr_scheduler.load_state_dict(saved.pop("lr_scheduler"))
    return saved


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker of a fold: its classes one after the other, each a UNet from scratch.

    One run per fold (one worker group start, not one per class). A checkpoint holds the class in training
    and which classes were finished and written before it (with their weights' sha256): a resumed run skips
    a finished class whose weights are in the store unchanged and retrains any other."""
    import time

    import ray.train
    import ray.train.torch

    cfg: LoraConfig = config["lora"]
    d = cfg.ddpm
    assert d is not None
    store: Store = config["store"]
    fold: int = config["fold"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # Ray's OMP_NUM_THREADS: no oversubscription
    device = ray.train.torch.get_device()
    saved: dict[str, Any] = {"class": None, "done": {}}
    checkpoint = ray.train.get_checkpoint()
    done: dict[str, str] = {}
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / "trainer.pt", map_location="cpu", weights_only=False)
        done = {name: sha for name, sha in saved["done"].items()
                if store.exists(weights_key(fold, name)) and store.sha256(weights_key(fold, name)) == sha}

    for class_name, seed, examples in config["classes"]:
        if class_name in done:
            continue
        pixels = load_pixels(store, examples, d)
        torch.manual_seed(seed)  # the same initial weights on every rank and in every rerun
        unet = build_unet(d).to(device)
        scheduler = noise_scheduler(d)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=d.lr, betas=tuple(d.adam_betas),
                                      weight_decay=d.weight_decay)
        sched = schedule(len(examples), d, world)
        lr_scheduler = make_lr_scheduler(optimizer, d, sched.total_steps)  # type: ignore[arg-type]  # warmup, decay
        ema = make_ema(unet, d)
        step, log = 0, []
        if checkpoint is not None and saved["class"] == class_name:
            with checkpoint.as_directory() as folder:
                restored = restore_checkpoint(Path(folder), unet, optimizer, lr_scheduler, device)
            step, log = int(restored["step"]), list(restored["log"])
            if ema is not None:
                ema.load_state_dict(restored["ema"])
        resumed_from = step
        model = ray.train.torch.prepare_model(unet, move_to_device=False) if world > 1 else unet
        model.train()
        seen = []
        started = time.perf_counter() - (log[-1]["time"] if log else 0.0)
        while step < sched.total_steps:
            epoch = step // sched.steps_per_epoch
            lr = optimizer.param_groups[0]["lr"]
            loss, used = train_step(model, scheduler, optimizer, lr_scheduler, pixels, sched, d, seed, rank, step,
                                    device)
            if ema is not None:
                ema.step(unet.parameters())
            seen.append([step, [examples[i].image_id for i in used]])
            step += 1
            loss = mean_over_ranks(loss, device)
            if rank == 0:
                log.append({"step": step, "epoch": epoch, "loss": loss, "lr": lr,
                            "time": time.perf_counter() - started})
                if config.get("progress") is not None:
                    config["progress"].set.remote(f"fold={fold}/{class_name}", step)
            last = step == sched.total_steps
            if last:  # the class's outputs first, so the checkpoint below can count it as done
                trained = weights_digest(model)
                if ema is not None:
                    ema.copy_to(unet.parameters())  # the averaged weights are the ones sampled
                write_class_outputs(store, fold, class_name, model, scheduler, log, rank, world, resumed_from, seen,
                                    trained)
                done[class_name] = store.sha256(weights_key(fold, class_name))
            if step % cfg.checkpoint_every_steps and not last:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(Path(tmp), model, optimizer, lr_scheduler,
                                    {"class": class_name, "step": step, "log": log, "done": dict(done),
                                     "ema": None if ema is None else ema.state_dict()})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"class": class_name, "step": step, "loss": loss}, checkpoint=ckpt)


def weights_key(fold: int, class_name: str) -> str:
    return layout.lora.ddpm_file(fold, class_name, layout.lora.ddpm_weights_file)


def write_class_outputs(store: Store, fold: int, class_name: str, model, scheduler, log: list[dict], rank: int,
                        world: int, resumed_from: int, seen: list, trained_digest: str) -> None:
    """Every rank: its record (examples used, digests of the written weights and of the trained ones before
    the EMA replaced them); rank 0: the UNet + scheduler (diffusers' layout) and the class's train_log.parquet.
    On DDP ranks > 0 wait for rank 0's files."""
    store.write_text(layout.lora.ddpm_rank(fold, class_name, rank), json.dumps({
        "rank": rank, "world": world, "resumed_from_step": resumed_from, "weights_digest": weights_digest(model),
        "trained_digest": trained_digest, "steps": seen}))
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            unwrap(model).save_pretrained(tmp, safe_serialization=True)
            scheduler.save_pretrained(tmp)
            for name in layout.lora.ddpm_files:
                store.write_file(layout.lora.ddpm_file(fold, class_name, name), Path(tmp) / name)
        store.write_table(layout.lora.ddpm_file(fold, class_name, "train_log.parquet"),
                          pa.Table.from_pylist(log, schema=LOG_SCHEMA))
    if world > 1:
        torch.distributed.barrier()  # every rank then reads the same weights' sha256


def train_ddpm_fold(ctx: StageContext, s: LoraSettings, fold: int, seed: int, examples: list[Example],
                    memo: Memo, advance: Advance | None = None) -> list[str]:
    """Train the fold's class models in one Ray Train run; return the fold's output keys. `advance` counts
    optimizer steps."""
    from t2id.lora.ray_layer import fit_on_ray_train
    from t2id.raycluster import ensure_ray, progress_relay

    store, cfg = ctx.store, s.lora
    by_class = class_examples(examples)
    missing = [t.name for t in cfg.target_classes if t.name not in by_class]
    if missing:
        raise UserError(f"fold {fold}: no TRAIN image holds {missing}, and lora.method ddpm trains one model per "
                        "class on that class's images only; drop the class from lora.target_classes or the fold "
                        "from lora.folds")
    classes = [(t.name, class_seed(seed, t.name), by_class[t.name]) for t in cfg.target_classes]
    run_name = f"fold={fold}-{memo.digest[:12]}"
    if ctx.force:  # retrain from scratch: Ray Train would otherwise restore this run's last checkpoint
        store.delete_prefix(layout.lora.ray_run(run_name))
    ensure_ray(ctx.cluster)
    with progress_relay(advance or (lambda n=1, status=None: None)) as relay:
        fit_on_ray_train(train_func, {"lora": cfg, "store": store, "fold": fold, "classes": classes,
                                      "progress": relay}, cfg, store, run_name)
    models: dict[str, dict] = {}
    logs: list[dict] = []
    keys: list[str] = []
    for name, cseed, part in classes:
        files = [layout.lora.ddpm_file(fold, name, n) for n in (*layout.lora.ddpm_files, "train_log.parquet")]
        keys += files
        models[name] = {"dir": layout.lora.ddpm_class(fold, name), "weights_sha256": store.sha256(weights_key(fold, name)),
                        "seed": cseed, "image_ids": [e.image_id for e in part]}
        logs += [{**row, "class": name} for row in store.read_table(files[-1]).to_pylist()]
    store.write_table(layout.lora.train_log(fold), pa.Table.from_pylist(logs, schema=CLASS_LOG_SCHEMA))
    store.write_text(layout.lora.train_ids(fold), json.dumps({
        "fold": fold, "method": "ddpm", "seed": seed,
        "image_ids": [e.image_id for e in examples],
        "examples": [{"image_id": e.image_id, "class": e.class_name, "prompt": e.prompt} for e in examples],
        "classes": models,
        "note": "unconditional DDPM per class, from scratch on the fold's TRAIN images of that class; no base "
                "model, no text conditioning (a row's prompt is its class name)",
    }, indent=1))
    # Last: the fold's generator is complete (generate reads it, and its sha256 is the fold's generator digest).
    store.write_text(layout.lora.ddpm_models(fold), json.dumps({"classes": models}, indent=1, sort_keys=True))
    return [*keys, layout.lora.train_log(fold), layout.lora.train_ids(fold), layout.lora.ddpm_models(fold)]

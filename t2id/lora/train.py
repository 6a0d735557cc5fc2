"""The LoRA training loop, free of Ray: adapter setup, batches, loss, one step, the epoch loop.

Read top to bottom:
  1. `add_unet_lora`        peft LoRA on the UNet attention projections; fp32 master weights.
     `add_text_encoder_lora` with lora.train_text_encoder, the same on both text encoders' attention
                            (q/k/v/out_proj); prompts are then encoded every step from cached token ids.
  2. `step_batches`         which cached examples each rank uses at each optimizer step.
  3. `diffusion_loss`       noise-prediction MSE, optional min-SNR weighting and noise offset;
     `prior_batch`          lora.method dreambooth_lora: a class-prior image per instance image (same class).
  4. `train_step`           one optimizer step (micro-batches, DDP no_sync, AMP, clipping).
  5. `fit`                  the loop over steps; the caller (Ray layer or a test) gets hooks.
  6. `save_checkpoint`      what a resumable checkpoint holds, and `restore_checkpoint`.

Determinism and resume: every random draw of a step (orientation, posterior sample, noise,
timesteps, LoRA dropout) comes from generators seeded by (seed, rank, step), and the data order
of an epoch from (seed, epoch). So restoring the step counter restores the RNG state exactly,
and a run resumed from a checkpoint takes the same steps as one that never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2id import layout
from t2id.errors import UserError
from t2id.lora.config import LoraConfig
from t2id.lora.data import LatentCache, encode_ids
from t2id.lora.models import speed_up

# 1. Adapter ------------------------------------------------------------------------------------


def add_unet_lora(unet, cfg: LoraConfig, weight_dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """Freeze the UNet, cast it to `weight_dtype`, add LoRA (rank, alpha, dropout from config).

    The LoRA parameters stay fp32 (master weights), as diffusers' scripts do with
    cast_training_params: fp16 updates of 1e-4 x grad would round to nothing.
    """
    from peft import LoraConfig as PeftLoraConfig

    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    # torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPUs), whatever the
    # model's saved config chose; set before the adapter so LoRA wraps the projections, not the processor.
    unet.set_attn_processor(AttnProcessor2_0())
    unet.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                    init_lora_weights="gaussian", target_modules=list(cfg.target_modules)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return params


TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_text_encoder_lora(encoder, cfg: LoraConfig, weight_dtype: torch.dtype = torch.float32
                          ) -> list[torch.nn.Parameter]:
    """Freeze a CLIP text encoder, cast it to `weight_dtype`, add LoRA (same rank, alpha, dropout as
    the UNet's) on its attention projections; the LoRA parameters stay fp32 master weights."""
    from peft import LoraConfig as PeftLoraConfig

    from t2id.compat import text_encoder_lora_problem

    # The config check ran where the config was validated; a worker's environment may differ.
    problem = text_encoder_lora_problem()
    if problem:
        raise UserError(f"lora.train_text_encoder: {problem}")
    encoder.requires_grad_(False)
    encoder.to(dtype=weight_dtype)
    encoder.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                       init_lora_weights="gaussian", target_modules=list(TEXT_ENCODER_TARGETS)))
    params = [p for p in encoder.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(module, "module", module)


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft naming (for checkpoints)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(unwrap(unet)).items()}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unwrap(unet), state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint does not match the adapter: unexpected keys {unexpected[:3]}")


def lora_digest(unet, *text_encoders) -> str:
    """sha256 over the adapter's weights, UNet then text encoders (ranks of a DDP run must agree)."""
    digest = hashlib.sha256()
    for i, module in enumerate((unet, *text_encoders)):
        for key, value in sorted(lora_state_dict(module).items()):
            digest.update(f"{i}/{key}".encode() if i else key.encode())
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def save_adapter(unet, out_dir, text_encoders: list | tuple = ()) -> None:
    """Write `layout.lora.adapter_file` (diffusers' name) that StableDiffusionXLPipeline.load_lora_weights reads:
    the UNet's LoRA, plus both text encoders' when `text_encoders` = [text_encoder, text_encoder_2]."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    def layers(module):
        return convert_state_dict_to_diffusers(lora_state_dict(module))

    extra = {}
    if text_encoders:
        first, second = text_encoders
        extra = {"text_encoder_lora_layers": layers(first), "text_encoder_2_lora_layers": layers(second)}
    StableDiffusionXLPipeline.save_lora_weights(out_dir, unet_lora_layers=layers(unet), safe_serialization=True,
                                                weight_name=layout.lora.adapter_file, **extra)


# 2. Batches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """How a dataset of n examples splits into optimizer steps over `world` ranks."""

    n: int
    world: int
    grad_accum: int
    micro_batch: int  # per rank, per micro-step
    steps_per_epoch: int
    epochs: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world * self.grad_accum

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def make_schedule(n: int, cfg: LoraConfig, world: int) -> Schedule:
    """Global batch = cfg.batch_size, shrunk (to a multiple of world x grad_accum) when there are fewer
    examples; an epoch is floor(n / global batch) steps (drop-last, so no rank sees padding)."""
    shards = world * cfg.grad_accum
    global_batch = min(cfg.batch_size, (n // shards) * shards)
    if global_batch == 0:
        raise ValueError(f"{n} training images cannot feed {world} workers x {cfg.grad_accum} accumulation "
                         "steps; lower lora.num_workers or lora.grad_accum")
    return Schedule(n=n, world=world, grad_accum=cfg.grad_accum, micro_batch=global_batch // shards,
                    steps_per_epoch=n // global_batch, epochs=cfg.epochs)


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def step_batches(schedule: Schedule, step: int, seed: int, rank: int) -> list[list[int]]:
    """Example indices of `rank` at global optimizer `step`: grad_accum micro-batches.

    Within an epoch the ranks' examples are disjoint: the step's slice of the epoch's permutation
    is cut into world x grad_accum contiguous pieces, rank r taking pieces r*accum .. r*accum+accum-1.
    """
    epoch, index = divmod(step, schedule.steps_per_epoch)
    order = epoch_order(schedule.n, epoch, seed)
    start = index * schedule.global_batch
    chunk = order[start:start + schedule.global_batch].tolist()
    per_rank = schedule.micro_batch * schedule.grad_accum
    mine = chunk[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i * schedule.micro_batch:(i + 1) * schedule.micro_batch] for i in range(schedule.grad_accum)]


def step_generator(seed: int, rank: int, step: int, micro: int = 0) -> torch.Generator:
    mixed = int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}/{micro}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(mixed & ((1 << 63) - 1))


# 3. Loss ---------------------------------------------------------------------------------------


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv 2303.09556, Sec. 3.4).

    SNR(t) = alpha_bar_t / (1 - alpha_bar_t). The x0-loss weight min(SNR, gamma) becomes, for an
    epsilon-prediction loss, min(SNR, gamma) / SNR (since ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR),
    and for v-prediction min(SNR, gamma) / (SNR + 1).
    """
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def draw_noise(latents: torch.Tensor, gen: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Gaussian noise, plus the noise offset: offset x N(0, 1) per (image, channel), constant over
    pixels, which lets the model change an image's mean brightness (Guttenberg 2023, 'Diffusion
    with offset noise'; diffusers' --noise_offset)."""
    noise = torch.randn(latents.shape, generator=gen)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
    return noise


def per_image_loss(pred: torch.Tensor, target: torch.Tensor, noise_scheduler, timesteps: torch.Tensor,
                   min_snr_gamma: float | None) -> torch.Tensor:
    """Per-image MSE in fp32, Min-SNR weighted when `min_snr_gamma` is set (Hang et al. 2023)."""
    per_pixel = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_image = per_pixel.mean(dim=list(range(1, per_pixel.ndim)))
    if min_snr_gamma is not None:
        per_image = per_image * min_snr_weights(noise_scheduler.alphas_cumprod, timesteps, min_snr_gamma,
                                                noise_scheduler.config.prediction_type)
    return per_image


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                   pooled_embeds: torch.Tensor, time_ids: torch.Tensor, gen: torch.Generator,
                   noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                   autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Noise-prediction loss of a batch (DDPM training objective, Ho et al. 2020, eq. 14).

    Random draws come from `gen` on CPU and move to the latents' device, so CPU and GPU runs
    draw the same numbers.
    """
    device = latents.device
    bsz = latents.shape[0]
    noise = draw_noise(latents.cpu(), gen, noise_offset).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    with autocast or contextlib.nullcontext():
        pred = unet(noisy, timesteps, prompt_embeds,
                    added_cond_kwargs={"text_embeds": pooled_embeds, "time_ids": time_ids},
                    return_dict=False)[0]
    per_image = per_image_loss(pred, target, noise_scheduler, timesteps, min_snr_gamma)
    return per_image.mean()


def instance_and_prior_losses(unet, noise_scheduler, instance: dict[str, torch.Tensor], prior: dict[str, torch.Tensor],
                              gen: torch.Generator, prior_gen: torch.Generator, noise_offset: float = 0.0,
                              min_snr_gamma: float | None = None,
                              autocast: contextlib.AbstractContextManager | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """DreamBooth's two noise-prediction losses (Ruiz et al. 2023, eq. 2) from ONE UNet forward over the
    instance and prior halves concatenated, as diffusers' train_dreambooth_lora does (one pass over the
    weights, one DDP forward per backward). Each half draws its noise and timesteps from its own
    generator, in diffusion_loss's order. `instance`/`prior`: latents, prompt_embeds, pooled_embeds,
    time_ids."""
    device = instance["latents"].device
    halves = []
    for part, g in ((instance, gen), (prior, prior_gen)):
        latents = part["latents"]
        noise = draw_noise(latents.cpu(), g, noise_offset).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=g).to(device)
        halves.append((latents, noise, timesteps))
    latents = torch.cat([h[0] for h in halves])
    noise = torch.cat([h[1] for h in halves])
    timesteps = torch.cat([h[2] for h in halves])
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    with autocast or contextlib.nullcontext():
        pred = unet(noisy, timesteps, torch.cat([instance["prompt_embeds"], prior["prompt_embeds"]]),
                    added_cond_kwargs={"text_embeds": torch.cat([instance["pooled_embeds"], prior["pooled_embeds"]]),
                                       "time_ids": torch.cat([instance["time_ids"], prior["time_ids"]])},
                    return_dict=False)[0]
    per_image = per_image_loss(pred, target, noise_scheduler, timesteps, min_snr_gamma)
    n = instance["latents"].shape[0]
    return per_image[:n].mean(), per_image[n:].mean()


def gather_batch(cache: LatentCache, indices: list[int], gen: torch.Generator, hflip: bool,
                 device: torch.device | str) -> dict[str, torch.Tensor]:
    """Batch tensors for the given examples: a posterior sample of one orientation each, with the
    prompt encodings and add_time_ids (same for both orientations: the crop is centred)."""
    idx = torch.tensor(indices, dtype=torch.long)
    if hflip and cache.orientations == 2:
        orientation = torch.randint(0, 2, (len(indices),), generator=gen)
    else:
        orientation = torch.zeros(len(indices), dtype=torch.long)
    mean = cache.latent_mean[idx, orientation].float()  # stored fp16; the sample is drawn in fp32
    std = cache.latent_std[idx, orientation].float()
    latents = mean + std * torch.randn(mean.shape, generator=gen)  # = latent_dist.sample()
    prompt = cache.prompt_index[idx]
    return {
        "prompt_index": prompt,  # CPU; rows of cache.prompt_ids when the text encoders train
        "latents": latents.to(device),
        "prompt_embeds": cache.prompt_embeds[prompt].to(device),
        "pooled_embeds": cache.pooled_embeds[prompt].to(device),
        "time_ids": cache.time_ids[idx].to(device),
    }


# 4. One step -----------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a checkpoint restores (the RNG state is a function of `step`, see module doc)."""

    unet: torch.nn.Module  # possibly DDP-wrapped
    params: list[torch.nn.Parameter]  # every trainable LoRA parameter (UNet, then text encoders)
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    noise_scheduler: Any
    scaler: Any = None  # torch.amp.GradScaler for fp16 on GPU
    text_encoders: list[torch.nn.Module] = field(default_factory=list)  # LoRA'd [te, te_2] when trained
    autocast_dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    seen: list[tuple[int, list[int]]] = field(default_factory=list)  # (step, example indices) this attempt
    # lora.method dreambooth_lora: the class-prior images' cache and, per instance example, the prior
    # examples of its class; the step's loss is then instance MSE + prior_loss_weight x prior MSE.
    prior_cache: LatentCache | None = None
    prior_of: list[list[int]] | None = None
    prior_loss_weight: float = 1.0
    terms: dict[str, float] = field(default_factory=dict)  # the last step's loss terms (rank mean: fit)
    # lora.method textual_inversion: keeps every embedding row but the new tokens' frozen (t2id.lora.textual_inversion)
    guard: Any = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def compute_dtypes(mixed_precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of frozen weights, autocast dtype): the frozen base in the training dtype, not fp32 under
    autocast (diffusers' train_text_to_image_lora_sdxl: weight_dtype), so no fp32 weight is read or cast
    at every forward; LoRA parameters and optimizer state stay fp32 (add_unet_lora). GPU: fp16/bf16.
    CPU has no fast fp16, so fp16 runs in fp32 there; bf16 runs in bf16 on CPU too."""
    if mixed_precision == "no":
        return torch.float32, None
    half = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    if device.type == "cuda" or half == torch.bfloat16:
        return half, half
    return torch.float32, None


def make_optimizer(params: list[torch.nn.Parameter], cfg: LoraConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LoraConfig, total_steps: int):
    """Linear warmup over warmup_steps, then constant / linear decay / cosine decay to 0."""
    warmup = cfg.warmup_steps
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / decay_steps)
        if cfg.lr_scheduler == "linear":
            return 1.0 - progress
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup_training(pipe, cfg: LoraConfig, n_examples: int, world: int = 1,
                   device: torch.device | str = "cpu", seed: int = 0, token_set: Any = None) -> TrainState:
    """Adapter, optimizer, LR schedule and noise schedule for training `pipe.unet` (not yet DDP-wrapped).

    The LoRA init draws from torch's global RNG, seeded here so every rank and every rerun starts
    from the same adapter (DDP would broadcast rank 0's anyway). lora.method textual_inversion: no LoRA;
    the pseudo-words of `token_set` (already added by t2id.lora.textual_inversion.add_tokens) are what trains.
    """
    from diffusers import DDPMScheduler

    device = torch.device(device)
    torch.manual_seed(seed)
    weight_dtype, autocast_dtype = compute_dtypes(cfg.mixed_precision, device)
    if cfg.method == "textual_inversion":
        return setup_textual_inversion(pipe, cfg, n_examples, world, device, token_set)
    params = add_unet_lora(pipe.unet, cfg, weight_dtype)
    pipe.unet.to(device)
    speed_up(pipe.unet, cfg.channels_last, cfg.compile)
    text_encoders = []
    if cfg.train_text_encoder:
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            params += add_text_encoder_lora(encoder, cfg, weight_dtype)
            encoder.to(device)
            text_encoders.append(encoder)
    optimizer = make_optimizer(params, cfg)
    schedule = make_schedule(n_examples, cfg, world)
    # Training noise schedule = the base model's betas in DDPM form (diffusers' training scripts).
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scaler = torch.amp.GradScaler("cuda") if weight_dtype == torch.float16 and device.type == "cuda" else None
    return TrainState(unet=pipe.unet, params=params, optimizer=optimizer,
                      lr_scheduler=make_lr_scheduler(optimizer, cfg, schedule.total_steps),
                      noise_scheduler=noise_scheduler, scaler=scaler, autocast_dtype=autocast_dtype, device=device,
                      text_encoders=text_encoders)


def setup_textual_inversion(pipe, cfg: LoraConfig, n_examples: int, world: int, device: torch.device,
                            token_set: Any) -> TrainState:
    """Frozen UNet (no LoRA), both text encoders frozen but the new tokens' embedding rows (Gal et al. 2022)."""
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from t2id.lora.textual_inversion import setup_encoders

    if token_set is None:
        raise RuntimeError("lora.method textual_inversion: add the pseudo-words (add_tokens) before setup_training")
    weight_dtype, autocast_dtype = compute_dtypes(cfg.mixed_precision, device)
    pipe.unet.requires_grad_(False)
    pipe.unet.to(device=device, dtype=weight_dtype)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    speed_up(pipe.unet, cfg.channels_last, cfg.compile)
    encoders, params, guard = setup_encoders(pipe, token_set, weight_dtype, device)
    optimizer = torch.optim.AdamW(params, lr=cfg.textual_inversion.lr, betas=tuple(cfg.adam_betas),
                                  weight_decay=cfg.weight_decay)
    schedule = make_schedule(n_examples, cfg, world)
    scaler = torch.amp.GradScaler("cuda") if weight_dtype == torch.float16 and device.type == "cuda" else None
    return TrainState(unet=pipe.unet, params=params, optimizer=optimizer,
                      lr_scheduler=make_lr_scheduler(optimizer, cfg, schedule.total_steps),
                      noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config), scaler=scaler,
                      autocast_dtype=autocast_dtype, device=device, text_encoders=encoders, guard=guard)


def prior_batch(state: TrainState, indices: list[int], gen: torch.Generator, hflip: bool) -> dict[str, torch.Tensor]:
    """DreamBooth's class-prior half of a micro-batch (Ruiz et al. 2023, Sec. 4.3): for each instance
    example, a prior image of its class drawn uniformly (from `gen`), as a batch of the prior cache."""
    assert state.prior_cache is not None and state.prior_of is not None
    picks = [state.prior_of[i][int(torch.randint(0, len(state.prior_of[i]), (1,), generator=gen))]
             for i in indices]
    return gather_batch(state.prior_cache, picks, gen, hflip, state.device)


def text_embeddings(state: TrainState, cache: LatentCache, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's (prompt_embeds, pooled): cached, or encoded now through the LoRA'd text encoders."""
    if not state.text_encoders:
        return batch["prompt_embeds"], batch["pooled_embeds"]
    if len(cache.prompt_ids) != len(state.text_encoders):
        raise RuntimeError("the latent cache holds no prompt token ids; rebuild it (lora.train_text_encoder "
                           "needs them)")
    ids = [ids[batch["prompt_index"]].to(state.device) for ids in cache.prompt_ids]
    with state.autocast():
        return encode_ids(state.text_encoders, ids)


def all_reduce_text_encoder_grads(state: TrainState) -> None:
    """Average the text encoders' LoRA gradients over the DDP group (the UNet's DDP wrapper does this
    for its own); parameters without a gradient (e.g. the last layer of text_encoder, whose output
    SDXL does not use) have none on every rank and are skipped alike."""
    if not state.text_encoders or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    for encoder in state.text_encoders:
        for p in encoder.parameters():
            if p.requires_grad and p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)


def train_step(state: TrainState, cache: LatentCache, cfg: LoraConfig, schedule: Schedule, seed: int,
               rank: int) -> float:
    """One optimizer step over grad_accum micro-batches; returns this rank's mean micro-batch loss.

    DDP all-reduces gradients in backward; for all but the last micro-batch `no_sync` skips that,
    so accumulation costs one all-reduce per step.
    """
    micro_batches = step_batches(schedule, state.step, seed, rank)
    state.seen.append((state.step, [i for micro in micro_batches for i in micro]))
    state.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(step_generator(seed, rank, state.step, -1).initial_seed())  # LoRA dropout
    losses = []
    instance_losses, prior_losses = [], []
    for i, indices in enumerate(micro_batches):
        gen = step_generator(seed, rank, state.step, i)
        batch = gather_batch(cache, indices, gen, cfg.hflip, state.device)
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(state.unet, "no_sync") else state.unet.no_sync()
        with sync:
            prompt_embeds, pooled_embeds = text_embeddings(state, cache, batch)
            if state.prior_cache is None:
                loss = diffusion_loss(state.unet, state.noise_scheduler, batch["latents"], prompt_embeds,
                                      pooled_embeds, batch["time_ids"], gen, cfg.noise_offset,
                                      cfg.min_snr_gamma, state.autocast())
            else:
                # DreamBooth's prior preservation (Ruiz et al. 2023, eq. 2): the same noise-prediction loss
                # on class images the base model drew, weighted by lambda; the prior half draws from a
                # generator of its own.
                prior_gen = step_generator(seed, rank, state.step, 1_000_000 + i)
                prior = prior_batch(state, indices, prior_gen, cfg.hflip)
                prior["prompt_embeds"], prior["pooled_embeds"] = text_embeddings(state, state.prior_cache, prior)
                instance = {**batch, "prompt_embeds": prompt_embeds, "pooled_embeds": pooled_embeds}
                instance_loss, prior_loss = instance_and_prior_losses(
                    state.unet, state.noise_scheduler, instance, prior, gen, prior_gen, cfg.noise_offset,
                    cfg.min_snr_gamma, state.autocast())
                instance_losses.append(instance_loss.detach().float().item())
                prior_losses.append(prior_loss.detach().float().item())
                loss = instance_loss + state.prior_loss_weight * prior_loss
            scaled = loss / len(micro_batches)
            (state.scaler.scale(scaled) if state.scaler else scaled).backward()
        losses.append(loss.detach().float().item())
    if prior_losses:
        state.terms = {"instance_loss": sum(instance_losses) / len(instance_losses),
                       "prior_loss": sum(prior_losses) / len(prior_losses)}
    all_reduce_text_encoder_grads(state)
    if state.guard is not None:
        state.guard.mask_grads()  # only the new tokens' rows learn (and count for clipping)
    if state.scaler:
        state.scaler.unscale_(state.optimizer)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(state.params, cfg.max_grad_norm)
    if state.scaler:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    if state.guard is not None:
        state.guard.restore_frozen()  # undo weight decay and the other words' updates, bit for bit
    state.lr_scheduler.step()
    state.step += 1
    return sum(losses) / len(losses)


# 5. The loop -----------------------------------------------------------------------------------


def mean_over_ranks(value: float, device: torch.device) -> float:
    """Mean of a scalar over the DDP group (the value itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.item() / torch.distributed.get_world_size()


@dataclass
class Hooks:
    """What the caller does around steps: checkpoint, report, validate. All optional."""

    after_step: Callable[[TrainState, dict[str, Any]], None] | None = None
    after_epoch: Callable[[TrainState, int], None] | None = None


def fit(state: TrainState, cache: LatentCache, cfg: LoraConfig, seed: int, rank: int = 0, world: int = 1,
        hooks: Hooks | None = None) -> TrainState:
    """Train from `state.step` to the schedule's last step. Rank 0 keeps the log rows
    (step, epoch, loss = mean over ranks, lr, time = seconds since this attempt started)."""
    hooks = hooks or Hooks()
    schedule = make_schedule(len(cache), cfg, world)
    state.unet.train()
    for encoder in state.text_encoders:
        encoder.train()
    started = time.perf_counter() - (state.log[-1]["time"] if state.log else 0.0)  # cumulative over resumes
    while state.step < schedule.total_steps:
        epoch = state.step // schedule.steps_per_epoch
        lr = state.optimizer.param_groups[0]["lr"]
        loss = mean_over_ranks(train_step(state, cache, cfg, schedule, seed, rank), state.device)
        row = {"step": state.step, "epoch": epoch, "loss": loss, "lr": lr,
               "time": time.perf_counter() - started}
        for name, value in state.terms.items():  # dreambooth_lora: instance_loss, prior_loss
            row[name] = mean_over_ranks(value, state.device)
        if rank == 0:
            state.log.append(row)
        if hooks.after_step:
            hooks.after_step(state, row)
        if state.step % schedule.steps_per_epoch == 0 and hooks.after_epoch:
            hooks.after_epoch(state, epoch)
    return state


# 6. Checkpoints --------------------------------------------------------------------------------

TEXT_ENCODER_FILES = ("lora_text_encoder.safetensors", "lora_text_encoder_2.safetensors")
EMBEDDINGS_FILE = "learned_embeds.safetensors"  # textual inversion checkpoints


def save_checkpoint(state: TrainState, folder: Path) -> None:
    """LoRA weights (UNet, and both text encoders when trained), optimizer, LR scheduler, grad scaler,
    step and log into `folder`. The RNG state needs no saving: it is a function of the step."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if state.guard is not None:  # textual inversion: the new tokens' rows are all that trained
        save_file(state.guard.rows(), str(folder / EMBEDDINGS_FILE))
    else:
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
    """The inverse of `save_checkpoint`, into a state built by `setup_training` with the same config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if state.guard is not None:
        state.guard.load_rows(load_file(str(folder / EMBEDDINGS_FILE)))
    else:
        load_lora_state_dict(state.unet, load_file(str(folder / "lora.safetensors"), device=str(state.device)))
    for i, encoder in enumerate(state.text_encoders if state.guard is None else ()):
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

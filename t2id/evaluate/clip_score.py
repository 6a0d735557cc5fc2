"""CLIP score of images against their prompts, from a local (or s3://) CLIP folder.

Real weights are a transformers `save_pretrained` folder of a CLIP model and its processor
(torchmetrics' CLIPScore uses openai/clip-vit-large-patch14 in this format; `t2id models
cache` writes it). The tiny stand-in is a randomly initialised transformers CLIP of the same
architecture family, saved the same way, with the real CLIP BPE vocabulary (converted from the
`bpe_simple_vocab_16e6.txt.gz` that open_clip ships), so prompts tokenize exactly as with
real CLIP and the stand-in goes through the same loading path.

score = 100 * max(cos(image_embed, text_embed), 0), as torchmetrics and Hessel et al. 2021.
The generate stage imports `ClipScorer` for its optional quality gate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2id.evaluate.metrics import clip_scores
from t2id.clip_vocab import CLIP_CONTEXT, build_clip_tokenizer, clip_vocab_and_merges
from t2id.evaluate.weights import resolve_weights_dir

CONFIG_KEY = "evaluate.clip_weights"
TINY_IMAGE_SIZE = 32


def build_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """Save a seeded random tiny CLIP (model + processor with the real BPE vocab) to `out_dir`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    vocab, merges = clip_vocab_and_merges()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": CLIP_CONTEXT,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"image_size": TINY_IMAGE_SIZE, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    # Random towers embed images and texts in unrelated directions, so most cosines are negative and
    # every clamped score would read 0. Give both final layer norms one shared bias and both towers
    # one projection: embeddings then share a component and scores are positive and still vary.
    with torch.no_grad():
        shared_bias = torch.randn(32) * 0.5
        model.vision_model.post_layernorm.bias.copy_(shared_bias)
        model.text_model.final_layer_norm.bias.copy_(shared_bias)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    tokenizer = build_clip_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                         crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    import os
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{os.getpid()}-{out_dir.name}")  # actors on one node may build at once
    model.save_pretrained(tmp)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
    try:
        tmp.replace(out_dir)  # a folder appears complete or not at all
    except OSError:  # another process published the same seeded folder first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_clip(source: str, cache_dir: Path, endpoint_url: str | None = None) -> Path:
    """Local CLIP folder for `evaluate.clip_weights`: 'tiny' (built into the cache), a folder or s3:// prefix."""
    if source == "tiny":
        path = Path(cache_dir).expanduser() / "tiny" / "clip-tiny-seed0"
        return path if (path / "config.json").is_file() else build_tiny_clip(path, seed=0)
    return resolve_weights_dir(source, cache_dir, CONFIG_KEY, endpoint_url)


def check_clip_source(source: str, endpoint_url: str | None = None) -> None:
    """Fail early, on the driver, with the config key when `evaluate.clip_weights` does not exist."""
    from t2id.evaluate.weights import CACHE_HINT
    from t2id.errors import UserError
    from t2id.store import open_store

    if source == "tiny":
        return
    present = (bool(open_store(source.rstrip("/"), endpoint_url=endpoint_url).list())
               if source.startswith("s3://") else Path(source).expanduser().is_dir())
    if not present:
        raise UserError(f"{CONFIG_KEY}: {source} not found; " + CACHE_HINT.format(kind="folder"))


class ClipScorer:
    """`ClipScorer(source, cache_dir, device)(images, prompts) -> np.ndarray` of per-pair CLIP scores."""

    def __init__(self, source: str = "tiny", cache_dir: str | Path = "~/.cache/t2id", device: str = "cpu",
                 endpoint_url: str | None = None, batch_size: int = 32) -> None:
        from t2id.errors import UserError

        path = resolve_clip(source, Path(cache_dir), endpoint_url)  # before the slow transformers import
        from transformers import CLIPModel, CLIPProcessor

        if not (path / "config.json").is_file():
            raise UserError(f"{CONFIG_KEY}: {source} has no config.json; expected a transformers CLIP "
                            "save_pretrained folder (as written by `t2id models cache`)")
        self.device = device
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(path)

    @torch.no_grad()
    def embed(self, images: list[Image.Image], prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Projected (image, text) embeddings, float32, in input order."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        image_embeds, text_embeds = [], []
        for start in range(0, len(images), self.batch_size):
            batch_images = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            batch_prompts = prompts[start:start + self.batch_size]
            pixels = self.processor(images=batch_images, return_tensors="pt")["pixel_values"]
            tokens = self.processor(text=batch_prompts, return_tensors="pt", padding=True, truncation=True,
                                    max_length=CLIP_CONTEXT)
            image_embeds.append(_as_tensor(self.model.get_image_features(pixel_values=pixels.to(self.device))))
            text_embeds.append(_as_tensor(self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device))))
        if not image_embeds:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        return (torch.cat(image_embeds).float().cpu().numpy(), torch.cat(text_embeds).float().cpu().numpy())

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        if not images:
            return np.zeros(0, dtype=np.float64)
        return clip_scores(*self.embed(images, prompts))


def _as_tensor(output) -> torch.Tensor:
    """transformers 5 returns a model output object from get_*_features; older versions a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output[0]

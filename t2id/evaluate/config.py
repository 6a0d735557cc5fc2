"""Config section of the `evaluate` stage (image-quality metrics, paper Table I)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from t2id.configbase import Section

# torch-fidelity's InceptionV3 converted from TF's 2015-12-05 FID graph: the weights torchmetrics'
# FID/KID/IS use. Only `t2id models cache` fetches it (and only with evaluate.allow_network).
INCEPTION_FID_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class HubSources(Section):
    """Where `t2id models cache` downloads from; nothing else reads these."""

    inception: str = Field(INCEPTION_FID_URL, description="URL of the FID InceptionV3 state dict (torch-fidelity).")
    clip: str = Field("openai/clip-vit-large-patch14",
                      description="Hugging Face id of the CLIP model for CLIP score (torchmetrics' default).")
    sdxl: str = Field("stabilityai/stable-diffusion-xl-base-1.0",
                      description="Hugging Face id of SDXL, used when lora.base_model is a path or s3:// URI.")


class EvaluateConfig(Section):
    inception_weights: str = Field(
        "tiny",
        description="FID InceptionV3 weights (torch-fidelity .pth state dict): 'tiny' (random stand-in), "
        "a local file or an s3:// URI. Never downloaded at run time.",
    )
    clip_weights: str = Field(
        "tiny",
        description="CLIP for CLIP score (transformers save_pretrained folder): 'tiny' (random stand-in), "
        "a local folder or an s3:// prefix. Never downloaded at run time.",
    )
    kid_subset_size: int = Field(1000, ge=2, description="KID subset size; capped at the smaller image set.")
    kid_subsets: int = Field(100, ge=1, description="Number of random KID subsets (mean and std over them).")
    is_splits: int = Field(10, ge=1, description="Inception Score splits (torch-fidelity: a fixed number; each (fold, class) needs at least "
                                              "this many synthetic images, else evaluate fails saying so).")
    batch_size: int = Field(32, ge=1, description="Images per forward pass of the feature extractors.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where feature extraction runs: 'auto' uses a GPU when the Ray cluster has one."
    )
    cache_features: bool = Field(
        True,
        description="Keep per-fold features (real: InceptionV3; synthetic: InceptionV3 + CLIP) in the run store "
        "and reuse them on reruns while the weights and image bytes are unchanged.",
    )
    allow_network: bool = Field(
        False, description="Allow `t2id models cache` to download weights (only that command; runs never do)."
    )
    hub: HubSources = Field(default_factory=HubSources, description="Download sources for `t2id models cache`.")

"""`t2id models ...` commands: fetch real weights once, on a machine with internet, for air-gapped runs.

`t2id models cache CONFIG [--out DIR] [--upload]` saves the weights a config names (the FID
InceptionV3, the CLIP model for CLIP score, the SDXL base model of lora.base_model) to a local
folder and, with --upload, copies them to the store (or to the s3:// URI the config already
names), then prints the config values that point at them. Runs never download anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from t2id import layout
from t2id.errors import UserError

app = typer.Typer(help="Model weights for air-gapped clusters.", no_args_is_help=True)
out = Console()

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelFetch:
    name: str  # folder name under --out and under <store>/models/
    config_key: str
    value: str  # the config's current value
    source: str  # what to download: a URL (inception) or a hub id
    upload_to: str | None  # the s3:// URI (or path) the config already names, if any
    kind: str  # "inception" | "clip" | "sdxl"


def plan_fetches(cfg) -> tuple[list[ModelFetch], list[str]]:
    """What `models cache` would fetch for a config, and why the rest is skipped."""
    candidates = [
        ("inception", "evaluate.inception_weights", cfg.evaluate.inception_weights, cfg.evaluate.hub.inception),
        ("clip", "evaluate.clip_weights", cfg.evaluate.clip_weights, cfg.evaluate.hub.clip),
        ("sdxl", "lora.base_model", cfg.lora.base_model, cfg.evaluate.hub.sdxl),
    ]
    fetches, skipped = [], []
    for kind, key, value, default in candidates:
        if value == "tiny":
            skipped.append(f"{key}: 'tiny' (random stand-in built locally), nothing to fetch")
        elif value.startswith("s3://"):
            fetches.append(ModelFetch(_name(default), key, value, default, value, kind))
        elif Path(value).expanduser().exists():
            skipped.append(f"{key}: {value} exists locally, nothing to fetch")
        elif value.startswith(("http://", "https://")) or (kind != "inception" and HUB_ID.match(value)):
            fetches.append(ModelFetch(_name(value), key, value, value, None, kind))  # the value is the source
        else:
            fetches.append(ModelFetch(_name(default), key, value, default, value, kind))  # a local target path
    return fetches, skipped


def _name(source: str) -> str:
    return source.rstrip("/").split("/")[-1]


def _download(fetch: ModelFetch, out_dir: Path) -> Path:
    """Download one model into out_dir/<kind>/<name>; return the local file or folder."""
    import torch

    dest = out_dir / fetch.kind / fetch.name
    if fetch.kind == "inception":
        from t2id.evaluate.features import load_inception

        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.is_file():
            torch.hub.download_url_to_file(fetch.source, str(dest), progress=True)
        load_inception(dest)  # the file must load through the same path the stage uses
        return dest
    if fetch.kind == "clip":
        from transformers import CLIPModel, CLIPProcessor

        CLIPModel.from_pretrained(fetch.source).save_pretrained(dest)
        CLIPProcessor.from_pretrained(fetch.source).save_pretrained(dest)
        return dest
    from diffusers import StableDiffusionXLPipeline

    try:  # fp16 weights as the paper trains in fp16; not every repository has that variant
        pipe = StableDiffusionXLPipeline.from_pretrained(fetch.source, torch_dtype=torch.float16, variant="fp16",
                                                         use_safetensors=True)
    except (OSError, ValueError):
        pipe = StableDiffusionXLPipeline.from_pretrained(fetch.source, use_safetensors=True)
    pipe.save_pretrained(dest)
    return dest


@app.command("cache")
def cache(
    config: Annotated[Path, typer.Argument(help="YAML config whose weights to fetch.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Local folder (default: <store.cache_dir>/models).")]
    = None,
    upload: Annotated[bool, typer.Option("--upload", help="Also copy the weights to the store.")] = False,
) -> None:
    """Save the weights CONFIG names (InceptionV3 for FID, CLIP, SDXL) locally and optionally to the store."""
    from t2id.config import load_config
    from t2id.evaluate.weights import upload_path
    from t2id.store import store_from_config

    cfg = load_config(config)
    if not cfg.evaluate.allow_network:
        raise UserError(f"{config}: evaluate.allow_network is false, and `t2id models cache` downloads weights; "
                        "set evaluate.allow_network: true (on a machine with internet) to allow it")
    fetches, skipped = plan_fetches(cfg)
    for line in skipped:
        out.print(f"[dim]skip[/] {line}")
    if not fetches:
        out.print("nothing to fetch: the config names no downloadable weights")
        return
    out_dir = (out_dir or Path(cfg.store.cache_dir).expanduser() / "models").resolve()
    settings = []
    for fetch in fetches:
        out.print(f"[bold]fetch[/] {fetch.config_key}: {fetch.source}")
        local = _download(fetch, out_dir)
        target = str(local)
        if upload:
            target = fetch.upload_to if fetch.upload_to and fetch.upload_to.startswith("s3://") \
                else store_from_config(cfg.store).uri(layout.evaluate.model(fetch.kind, fetch.name))
            upload_path(local, target, endpoint_url=cfg.store.endpoint_url)
            out.print(f"  uploaded to {target}")
        settings.append(f"{fetch.config_key}: {target}")
    out.print("\nuse these config values (the cluster then needs no internet):")
    for line in settings:
        out.print(f"  {line}", highlight=False)

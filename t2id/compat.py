"""Checks that the installed libraries can do what a config asks, before any work starts.

Text-encoder LoRA goes through transformers' PEFT integration (`CLIPTextModel.add_adapter`),
which refuses a peft older than its `MIN_PEFT_VERSION` with a bare ValueError deep inside the
trainer. transformers 5.24 raised that minimum to peft 0.22, which was not released when it
came out (2026-11-29), so a fresh `pip install` could resolve a pair that cannot work. We ask
transformers for its own minimum instead of keeping a table, so the check stays right for
releases we have not seen.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import InvalidVersion, Version

FIX = "install the locked versions (`make install`, or `pip install -r requirements.lock`)"


def peft_pair_problem(transformers_version: str, peft_version: str | None, min_peft: str | None) -> str | None:
    """Why this transformers/peft pair cannot do text-encoder LoRA, or None when it can.

    `min_peft` is transformers' `MIN_PEFT_VERSION` (None for releases that have none);
    `peft_version` is None when peft is not installed.
    """
    if peft_version is None:
        return f"text-encoder LoRA needs peft, which is not installed; {FIX}"
    if min_peft is None:
        return None
    try:
        too_old = Version(peft_version) < Version(min_peft)
    except InvalidVersion:
        return None  # a local or dev build we cannot order; let transformers decide
    if too_old:
        return (f"text-encoder LoRA needs peft >= {min_peft} with the installed transformers "
                f"{transformers_version}, but peft {peft_version} is installed; {FIX} "
                f"(it pins transformers < 5.24, which accepts peft >= 0.20), or set lora.train_text_encoder: false")
    return None


def installed_peft_pair() -> tuple[str, str | None, str | None]:
    """(transformers version, peft version or None, transformers' MIN_PEFT_VERSION or None)."""
    try:
        peft_version: str | None = metadata.version("peft")
    except metadata.PackageNotFoundError:
        peft_version = None
    transformers_version = metadata.version("transformers")
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION as min_peft
    except ImportError:  # releases before the integration module kept no minimum we can read
        min_peft = None
    return transformers_version, peft_version, min_peft


def text_encoder_lora_problem() -> str | None:
    """Why this environment cannot do text-encoder LoRA, or None when it can."""
    return peft_pair_problem(*installed_peft_pair())

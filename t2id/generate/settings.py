"""What the `generate` stage takes from the config, from any section, and nothing else.

The runner hashes this model into the stage marker, so a value outside the generate section
(a prompt in lora.target_classes, lora.base_model, run.seed, ...) re-runs generate exactly when
it is named here. It is also what the generation actors build themselves from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import model_validator

from t2id import layout
from t2id.configbase import StageSettings
from t2id.generate.config import GenerateConfig
from t2id.lora.config import TargetClass
from t2id.lora.methods import DdpmConfig, DreamBoothConfig, LayoutConfig, Method, TextualInversionConfig

if TYPE_CHECKING:
    from t2id.config import T2IDConfig

# base_model of lora.method ddpm's images (settings, manifest rows): there is none, the DDPMs start from scratch.
DDPM_BASE_MODEL = "none:ddpm-from-scratch"
# generate fields lora.method ddpm does not read (lora.ddpm sets the size and steps): reset to their defaults
# in its settings, so they change no hash.
UNUSED_BY_DDPM = ("width", "height", "steps", "guidance", "scheduler", "negative_prompt", "dtype")


class GenerateSettings(StageSettings):
    generate: GenerateConfig
    target_classes: list[TargetClass]  # lora.target_classes: the classes to draw, prompted as the adapter learnt them
    base_model: str  # lora.base_model
    allow_network: bool  # lora.allow_network
    run_seed: int  # run.seed: every image's seed derives from it
    use_adapter: bool  # lora in run.stages: draw with lora/fold=<k>/ adapters, else with the base model alone
    folds: list[int] | None  # generate.folds, else lora.folds when lora runs (the folds that have an adapter)
    clip_weights: str | None  # evaluate.clip_weights, only when generate.quality.min_clip_score is set
    method: Method = "lora"  # lora.method when lora runs (the base model alone draws like 'lora')
    dreambooth: DreamBoothConfig | None = None  # lora.dreambooth, only with method dreambooth_lora (identifier)
    textual_inversion: TextualInversionConfig | None = None  # lora.textual_inversion, only with that method
    layout: LayoutConfig | None = None  # lora.layout, only with method layout_lora (requested boxes in prompts)
    ddpm: DdpmConfig | None = None  # lora.ddpm, only with method ddpm (resolution, sampling steps)

    @model_validator(mode="after")
    def _clip_weights_with_the_clip_gate(self) -> GenerateSettings:
        if (self.clip_weights is not None) != (self.generate.quality.min_clip_score is not None):
            raise ValueError("clip_weights names the CLIP weights of the CLIP gate: set it exactly when "
                             "generate.quality.min_clip_score is set")
        return self

    @model_validator(mode="after")
    def _the_method_section_with_its_method(self) -> GenerateSettings:
        from t2id.lora.config import METHOD_SECTIONS

        for method, section in METHOD_SECTIONS.items():
            if (getattr(self, section) is not None) != (self.method == method):
                raise ValueError(f"{section} holds the settings of method {method}: set it exactly when "
                                 f"method is {method} (method is {self.method!r})")
        return self

    def generator_key(self, fold: int) -> str:
        """The lora stage's output that makes fold `fold`'s generator: its learnt embeddings for
        textual_inversion, its class-model index for ddpm (a row's lora_sha256 is then its class's weights'
        sha256, from that index), else its LoRA adapter (lora_sha256 in the manifest is this file's sha256)."""
        if self.method == "ddpm":
            return layout.lora.ddpm_models(fold)
        return layout.lora.embeddings(fold) if self.method == "textual_inversion" else layout.lora.adapter(fold)

    @property
    def folds_field(self) -> str:
        """The config key `folds` came from, for errors."""
        return "generate.folds" if self.generate.folds is not None or not self.use_adapter else "lora.folds"


def settings(cfg: T2IDConfig) -> GenerateSettings:
    gen = cfg.generate
    use_adapter = "lora" in cfg.run.stages
    folds = gen.folds if gen.folds is not None else (cfg.lora.folds if use_adapter else None)
    clip_gate = gen.quality.min_clip_score is not None
    method = cfg.lora.method if use_adapter else "lora"
    targets, base_model = cfg.lora.target_classes, cfg.lora.base_model
    if method == "ddpm":  # unconditional, from scratch: the prompts, base model and SDXL sampling take no part
        targets = [TargetClass(name=t.name, prompts=[t.name]) for t in targets]
        base_model = DDPM_BASE_MODEL
        gen = gen.model_copy(update={name: GenerateConfig.model_fields[name].default for name in UNUSED_BY_DDPM})
    return GenerateSettings(generate=gen, target_classes=targets, base_model=base_model,
                            allow_network=cfg.lora.allow_network, run_seed=cfg.run.seed, use_adapter=use_adapter,
                            folds=folds, clip_weights=cfg.evaluate.clip_weights if clip_gate else None,
                            method=method, dreambooth=cfg.lora.dreambooth if use_adapter else None,
                            textual_inversion=cfg.lora.textual_inversion if use_adapter else None,
                            layout=cfg.lora.layout if use_adapter else None,
                            ddpm=cfg.lora.ddpm if use_adapter else None)

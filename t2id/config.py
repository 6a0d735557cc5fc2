"""The one config file: a pydantic model per section, `extra="forbid"` everywhere.

Each stage owns its section model (`t2id/<stage>/config.py`); this module assembles them into
`T2IDConfig`, loads YAML safely, turns validation errors into one line per problem that names
the key path, the offending value and the fix, and hashes sections for stage markers.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from t2id.cluster_config import ClusterConfig
from t2id.configbase import Section
from t2id.data.config import DataConfig
from t2id.grid.config import GridConfig
from t2id.errors import ConfigError
from t2id.evaluate.config import EvaluateConfig
from t2id.generate.config import GenerateConfig
from t2id.label.config import LabelConfig
from t2id.lora.config import LoraConfig
from t2id.report.config import ReportConfig
from t2id.split.config import SplitConfig
from t2id.tracking import TrackingConfig

STAGES: tuple[str, ...] = ("data", "split", "lora", "generate", "label", "evaluate", "grid", "report")
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class RunConfig(Section):
    id: str = Field("t2id-run", description="Run id: the run lives under <store>/<id>/; the same id resumes the run.")
    seed: int = Field(0, ge=0, description="Root seed; every random choice in every stage derives from it.")
    task: Literal["detect", "classify"] = Field(
        "detect", description="detect: boxes (YOLO dataset, detector grid); classify: image-level labels (image-folder "
                              "or CSV dataset, classifier grid; t2id.classify). Classify has no label stage.")
    stages: list[str] = Field(list(STAGES), description="Stages `t2id run` executes, in pipeline order "
                                                        "(default: all; for run.task classify, all but label).")
    description: str = Field("", description="Free text shown in the report.")
    # How the run is watched, not what it produces: in no stage's settings, so it never reruns a stage.
    tracking: TrackingConfig = Field(default_factory=TrackingConfig,
                                     description="Experiment tracking: MLflow and TensorBoard (t2id.tracking).")

    @field_validator("id")
    @classmethod
    def _id_is_a_path_segment(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
            raise ValueError("use letters, digits, '.', '_' or '-' (it becomes a folder/prefix name)")
        return value

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        return [s for s in STAGES if s in value]  # pipeline order, whatever order was written

    @model_validator(mode="after")
    def _classify_has_no_label_stage(self) -> "RunConfig":
        # A synthetic image's class is the class its prompt asked for (label_source "prompt"): nothing to label.
        if self.task == "classify" and "label" in self.stages:
            if "stages" in self.model_fields_set:
                raise ValueError("run.stages lists 'label' but run.task is classify: a synthetic image's class is "
                                 "its prompt's class, there are no boxes to label; remove 'label' from run.stages")
            self.stages = [s for s in self.stages if s != "label"]
        return self


class StoreConfig(Section):
    uri: str = Field("./t2id-runs", description="Local folder or s3://bucket/prefix holding all runs.")
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, Ceph, ...). Default: AWS_ENDPOINT_URL, else AWS."
    )
    region: str | None = Field(None, description="S3 region. Default: the standard AWS chain.")
    max_attempts: int = Field(8, ge=1, le=50, description="Attempts per S3 call (exponential backoff).")
    cache_dir: str = Field("~/.cache/t2id", description="Local cache for materialized datasets and models.")


class T2IDConfig(Section):
    run: RunConfig = RunConfig()
    store: StoreConfig = StoreConfig()
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    lora: LoraConfig = LoraConfig()
    generate: GenerateConfig = GenerateConfig()
    label: LabelConfig = LabelConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    grid: GridConfig = GridConfig()
    report: ReportConfig = ReportConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> "T2IDConfig":
        """Checks that span sections (each section validates itself)."""
        stages = set(self.run.stages)
        if self.run.task == "classify":
            from t2id.classify.config import check_classify_config
            check_classify_config(self)
        elif self.data.labels is not None:
            raise ValueError("data.labels (a classification CSV) is set but run.task is detect; set run.task: "
                             "classify, or remove data.labels")
        elif self.report.metric in ("f1", "auc"):
            raise ValueError(f"report.metric {self.report.metric!r} is a classification metric but run.task is detect; "
                             "use map50_95, map50, precision or recall")
        if (self.lora.method == "layout_lora" and "label" in stages
                and self.label.method in ("inpaint", "inpaint_outpaint")):
            method = self.label.method
            raise ValueError(f"lora.method is layout_lora but label.method is {method}: the {method} method labels "
                             "images it inpaints into real ones and leaves the generated images, which carry their "
                             "requested boxes, unused; set label.method: teacher (it keeps their boxes and measures "
                             "layout fidelity)")
        if self.lora.method == "ddpm" and "label" in stages and self.label.method in ("inpaint", "inpaint_outpaint"):
            raise ValueError(f"lora.method is ddpm but label.method is {self.label.method}: inpainting needs a "
                             "text-to-image pipeline (SDXL) and ddpm trains unconditional DDPMs without one; set "
                             "label.method: teacher")
        ev = self.evaluate
        # Random stand-in metric networks only beside the tiny random generator: with a real SDXL,
        # FID/KID/IS/CLIP from random nets would sit next to the paper's values looking comparable.
        if self.lora.base_model != "tiny":
            needed = []
            if "evaluate" in stages:
                needed += [("evaluate.inception_weights", ev.inception_weights), ("evaluate.clip_weights", ev.clip_weights)]
            elif "generate" in stages and self.generate.quality.min_clip_score is not None:
                needed.append(("evaluate.clip_weights", ev.clip_weights))  # the CLIP gate scores with it
            stand_ins = [key for key, value in needed if value == "tiny"]
            if stand_ins:
                raise ValueError(
                    f"{' and '.join(stand_ins)} {'are' if len(stand_ins) > 1 else 'is'} 'tiny' (random stand-in "
                    f"networks, scores not comparable with anything) but lora.base_model is "
                    f"{self.lora.base_model!r}; run `t2id models cache CONFIG --upload` on a machine with "
                    f"internet (evaluate.allow_network: true) and set {' and '.join(stand_ins)} to the paths it "
                    f"prints (under <store>/models/)")
        if "evaluate" in stages and "generate" in stages and ev.is_splits > self.generate.images_per_class:
            raise ValueError(
                f"evaluate.is_splits={ev.is_splits} > generate.images_per_class={self.generate.images_per_class}: the "
                f"Inception Score needs at least one image per split (torch-fidelity's rule); set evaluate.is_splits "
                f"<= {self.generate.images_per_class}")
        return self



_SECRET_PATH = re.compile(r"(^|\.)(env|.*(secret|token|password|credential|access_key).*)(\.|$)", re.IGNORECASE)


def _format_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<top level>"
    kind = err["type"]
    ctx = err.get("ctx", {})
    got = err.get("input")
    if _SECRET_PATH.search(path):
        got = "<hidden>"  # never echo what may be a credential back into logs
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        hint = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"allowed keys: {', '.join(allowed)}"
        return f"{path}: unknown key; {fix}"
    if kind == "missing":
        return f"{path}: required key is missing"
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}
    if kind in bounds:
        return f"{path}: must be {bounds[kind].format(**ctx)}, got {got!r}"
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a cross-section check: its message names the keys; the input is the whole config
        return msg
    return f"{path}: {msg[0].lower() + msg[1:]}, got {got!r}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at `loc`, for 'did you mean' hints."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> T2IDConfig:
    """Validate a parsed config; raise ConfigError with one line per problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return T2IDConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {_format_error(e, T2IDConfig)}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from exc


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> T2IDConfig:
    """Load a YAML config (safe loader), apply dotted-key overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass a YAML file (see configs/demo.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    raw = raw or {}
    for dotted, value in (overrides or {}).items():
        apply_override(raw, dotted, value)
    return validate_config(raw, source=str(path))


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw['a']['b'] = value for 'a.b', creating mappings on the way."""
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def dump_config(config: T2IDConfig) -> str:
    """The effective config as YAML, defaults filled in (what `config show` prints and runs save)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, width=100)


def builtin_config_dirs() -> list[Path]:
    """Where built-in configs live: a checkout's configs/, else the copy a regular (non-editable)
    install puts in <prefix>/share/t2id/configs (pyproject data-files), e.g. in the images."""
    here = Path(__file__).resolve()
    prefix = here.parents[4] if len(here.parents) > 4 else here.parent  # <prefix>/lib/pythonX.Y/site-packages/t2id
    return [REPO_CONFIGS, prefix / "share" / "t2id" / "configs", Path(sys.prefix) / "share" / "t2id" / "configs"]


def builtin_config(name: str) -> Path:
    """Path of a config shipped with t2id (the repository's configs/ folder, e.g. 'demo')."""
    dirs = builtin_config_dirs()
    path = next((d / f"{name}.yaml" for d in dirs if (d / f"{name}.yaml").is_file()), None)
    if path is None:
        raise ConfigError(f"built-in config '{name}' not found in {', '.join(map(str, dirs))}; reinstall t2id "
                          "(pip install .) so its configs are installed")
    return path

"""Config section of the `data` stage."""

from __future__ import annotations

from pydantic import Field

from t2id.configbase import Section

PAPER_CLASSES = [
    "thyroid cartilage",
    "cricoid cartilage",
    "tracheal ring",
    "strap muscle",
    "thyroid lobe",
    "vocal fold",
]


class PhantomConfig(Section):
    subjects: int = Field(6, ge=1, description="Number of phantom subjects.")
    frames_per_subject: int = Field(12, ge=1, description="Cine-loop frames per subject.")
    size: int = Field(320, ge=32, description="Image side in pixels.")
    seed: int = Field(0, ge=0, description="Phantom seed (independent of run.seed).")


class DataConfig(Section):
    source: str = Field(
        "phantom",
        description="YOLO dataset to import: a local folder, an s3:// prefix, or 'phantom' to generate one.",
    )
    phantom: PhantomConfig = PhantomConfig()
    subject_map: str | None = Field(None, description="CSV/YAML file mapping image path/stem -> subject id.")
    subject_regex: str | None = Field(
        None, description="Regex with a named group 'subject' applied to the image file name."
    )
    class_names: list[str] | None = Field(
        None, description="Class names; default: the dataset's data.yaml `names`."
    )
    strict: bool = Field(False, description="Fail the import when any file is rejected (default: quarantine it).")

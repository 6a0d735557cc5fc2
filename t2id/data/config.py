"""Config section of the `data` stage."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

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
    subject_map: str | None = Field(
        None,
        description="CSV (image,subject) or YAML/JSON mapping image -> subject id. Keys are image paths relative "
                    "to the dataset root (images/s1/frame001.png); a shorter tail (s1/frame001.png, a file name, "
                    "a path without extension) is accepted only when it names exactly one image, else the import "
                    "fails listing the clashes. The map file's own path is looked up in the working directory, "
                    "then in the dataset. Default "
                    "(no map, no regex): subjects.csv at the dataset root (the phantom writes one).",
    )
    subject_regex: str | None = Field(
        None, description="Regex with a named group 'subject' applied to the image file name."
    )
    labels: str | None = Field(
        None, description="run.task classify only: CSV with columns path,label[,subject] (header required; paths "
                          "relative to the dataset root); default: the image folder layout <root>/<class name>/*. "
                          "Looked up in the working directory, then in the dataset.",
    )
    class_names: list[str] | None = Field(
        None, description="Class names; default: the dataset's data.yaml `names`."
    )
    strict: bool = Field(False, description="Fail the import when any file is rejected (default: quarantine it).")
    box_tolerance: float = Field(
        1e-3, ge=0.0, le=0.05,
        description="How far (fraction of the image side) a box may poke out of the image and still be "
                    "accepted (then clipped); annotation tools often round to just past the border.",
    )
    workers: int = Field(8, ge=1, le=64, description="Threads that read, hash, decode and copy images.")
    max_pixels: int = Field(
        50_000_000, ge=1, le=178_956_970,
        description="Largest image accepted, in pixels (width x height), read from the file's header before "
                    "anything is decoded: a 20000 x 20000 PNG can take 400 KB on disk and 400 MB to decode. "
                    "At most 178956970, above which Pillow (every stage's image reader) refuses to open an image.",
    )

    @field_validator("subject_regex")
    @classmethod
    def _regex_has_subject_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        if "subject" not in compiled.groupindex:
            raise ValueError("needs a named group 'subject', e.g. '^(?P<subject>[^_]+)_'")
        return value

    @field_validator("class_names")
    @classmethod
    def _names_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value or any(not n.strip() for n in value):
                raise ValueError("give at least one non-empty class name")
            dupes = sorted({n for n in value if value.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate class names {dupes}")
        return value

    @model_validator(mode="after")
    def _subject_source(self) -> "DataConfig":
        if self.subject_map is not None and self.subject_regex is not None:
            raise ValueError("data.subject_map and data.subject_regex are both set; keep one of them")
        return self

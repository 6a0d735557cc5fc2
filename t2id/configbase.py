"""Base class of every config section (kept apart from t2id.config to avoid import cycles)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageSettings(BaseModel):
    """What one stage takes from the config, from any section, and nothing else.

    Built by the stage's `settings(cfg)`; the runner hashes it into the stage marker, so a value
    changes exactly the stages whose settings hold it. Frozen and picklable: this object (not the
    whole config) is what crosses into Ray workers, which re-validate it on arrival.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

"""Config section of the `split` stage."""

from __future__ import annotations

from pydantic import Field

from t2id.configbase import Section


class SplitConfig(Section):
    folds: int = Field(4, ge=2, description="k of subject-grouped k-fold cross-validation (paper: 4).")
    stratify: bool = Field(True, description="Balance class proportions across folds as far as groups allow.")

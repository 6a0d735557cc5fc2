"""Config section of the `report` stage."""

from __future__ import annotations

from pydantic import Field

from t2id.configbase import Section


class ReportConfig(Section):
    title: str = Field("T2ID-CAS report", description="Report title.")
    bootstrap_samples: int = Field(2000, gt=0, description="Paired bootstrap resamples for CIs vs baseline.")

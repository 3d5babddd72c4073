"""Settings of the scheduled re-evaluation (``reevaluate`` section of a profile).

The flow that uses them, ``flows.deployments.reevaluate_flow``, takes the whole ``PipelineConfig``; the
model lives in this small module so ``flows/config.py`` can compose it without importing the
deployments module (which imports ``flows.config`` itself).
"""

from __future__ import annotations

import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from questions.datasets import DatasetConfig

# Five fields of digits, names (MON, JAN), ranges, lists and steps. Prefect checks the full grammar when
# the deployment is built; this catches typos while the profile is loaded, with its file and key.
CRON_FIELD = re.compile(r"^[0-9A-Za-z*?,/\-]+$")


class ReevalConfig(BaseModel):
    """Which adapters the scheduled re-evaluation scores, on which question sets, and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="give the reevaluate deployment its cron schedule")
    cron: str = Field("0 2 * * *", description="when it runs (cron syntax; default: every night at 02:00)")
    timezone: str = Field("UTC", description="IANA time zone of the cron schedule, e.g. Europe/Paris")
    adapters: tuple[str, ...] = Field(
        (), description="adapter artifact ids to evaluate; empty = the newest complete adapter in the store")
    datasets: tuple[DatasetConfig, ...] = Field(
        (), description="question sets; empty = the evaluate section's datasets")

    @field_validator("cron")
    @classmethod
    def _five_cron_fields(cls, cron: str) -> str:
        fields = cron.split()
        if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields):
            raise ValueError(f"{cron!r} is not a cron expression of 5 fields (minute hour day month weekday)")
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, timezone: str) -> str:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r} (use an IANA name such as 'Europe/Paris')") from None
        return timezone

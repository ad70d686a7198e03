"""A monitor's spec (``PUT /v1/monitors/{endpoint}``): which columns are tested how, over which
window of the prediction log and how often, sliced by which columns, which alert rules and
channels, and the retraining policy. Stored on the ``monitors`` row; every run records the
``spec_version`` it ran with."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.errors import InvalidInput

__all__ = ["MonitorSpec", "WindowSpec", "ScheduleSpec", "PerformanceSpec", "ReferenceSpec", "parse_monitor_spec"]

_MAX_COLUMNS = 10_000


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WindowSpec(_Spec):
    """The logged predictions one run reads: the newest ``rows``, or the last ``hours``."""

    rows: int | None = Field(None, ge=1, description="The newest N logged rows (of the last 30 days).")
    hours: float | None = Field(None, gt=0, le=24 * 365, description="The rows logged in the last H hours.")

    @model_validator(mode="after")
    def _one(self) -> WindowSpec:
        if (self.rows is None) == (self.hours is None):
            raise ValueError("a window is either {'rows': N} or {'hours': H}")
        return self


class ScheduleSpec(_Spec):
    """How often the DriftMonitor queues a run of this monitor."""

    every_s: float = Field(..., ge=5, le=30 * 86400, description="Seconds between two scheduled runs.")


class PerformanceSpec(_Spec):
    """Performance from the feedback join, and its estimate (CBPE) before labels arrive."""

    enabled: bool = Field(True, description="Measure performance (and estimate it) in every run.")
    bucket_s: float | None = Field(
        None, gt=0, description="Also report metrics per time bucket of this many seconds (None: the window only)."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the intervals.")


class ReferenceSpec(_Spec):
    """Which version's reference profile the window is compared with."""

    version: str | None = Field(
        None, pattern=r"^[0-9]{1,12}$",
        description="A version of the endpoint's model; None: the version the endpoint serves when the run starts.",
    )


class MonitorSpec(_Spec):
    """What ``PUT /v1/monitors/{endpoint}`` takes. Defaults follow Evidently's DataDriftPreset:
    every feature, the test chosen per column by type and reference size, p-value threshold
    0.05, distance threshold 0.1, dataset drift when half the columns drift."""

    features: list[str] | None = Field(
        None, max_length=_MAX_COLUMNS, description="Columns to test; None: every feature of the reference profile."
    )
    categorical: list[str] = Field(
        default_factory=list, max_length=_MAX_COLUMNS,
        description="Columns to treat as categorical whatever their values (numeric codes, for instance).",
    )
    tests: Literal["auto"] | dict[str, str] = Field(
        "auto", description="'auto' (the default choice per column) or {column: test} for the columns to set; "
        "tests: ks, chisquare, z, psi, wasserstein, jensenshannon, hellinger.",
    )
    default_test: str = Field("auto", description="The test of every column not named in `tests` ('auto': by type and size).")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="{column: threshold} ('*' for every column): a p-value for p-value tests, "
        "a distance for distances; defaults 0.05 and 0.1.",
    )
    correction: Literal["none", "bonferroni", "bh"] = Field(
        "none", description="Multiple-testing correction of the p-value tests: none, bonferroni or bh "
        "(Benjamini-Hochberg).",
    )
    drift_share: float = Field(
        0.5, gt=0, le=1, description="Dataset drift is detected when at least this share of the columns drift.",
    )
    window: WindowSpec = Field(default_factory=lambda: WindowSpec(hours=24), description="What one run reads.")
    schedule: ScheduleSpec | None = Field(None, description="Scheduled runs; None: only POST .../run.")
    segments: list[str] = Field(
        default_factory=list, max_length=10,
        description="Columns to slice by (an input feature, or 'variant'): drift and performance per value "
        "(the 20 most frequent values of each).",
    )
    prediction_drift: bool = Field(True, description="Also test the predictions against the holdout's.")
    min_rows: int = Field(30, ge=1, description="Fewer logged rows in the window: the run records no drift verdict.")
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec, description="Performance and CBPE.")
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec, description="The reference profile's version.")
    alerts: dict[str, Any] = Field(
        default_factory=dict, description="{rules: [...], channels: [...]} (docs/monitoring.md, 'Alerts').",
    )
    retraining: dict[str, Any] | None = Field(
        None, description="The retraining policy (docs/monitoring.md, 'The closed loop'); None: no retraining.",
    )

    @field_validator("tests")
    @classmethod
    def _tests(cls, value):
        if isinstance(value, dict):
            from app.monitoring.drift import DRIFT_TESTS

            for column, name in value.items():
                if name not in DRIFT_TESTS:
                    raise ValueError(f"tests[{column!r}]: unknown test {name!r}; use one of {sorted(DRIFT_TESTS)}")
        return value

    @field_validator("default_test")
    @classmethod
    def _default_test(cls, value: str) -> str:
        from app.monitoring.drift import DRIFT_TESTS

        if value != "auto" and value not in DRIFT_TESTS:
            raise ValueError(f"unknown test {value!r}; use 'auto' or one of {sorted(DRIFT_TESTS)}")
        return value

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for column, threshold in value.items():
            if not 0 < threshold < 1e6:
                raise ValueError(f"thresholds[{column!r}] = {threshold} must be positive")
        return value


def _validated(model, data: Any, prefix: str):
    """``model`` from ``data``; InvalidInput naming the first bad field (under ``prefix``)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = prefix + ".".join(str(p) for p in err["loc"]) if err["loc"] else prefix.rstrip(".")
        raise InvalidInput(f"invalid monitor: {field}: {err['msg']}", details={"field": field}) from None


def parse_monitor_spec(body: dict[str, Any]) -> tuple[MonitorSpec, Any, Any]:
    """(spec, alerts spec, retraining spec) from a request body; InvalidInput naming the field."""
    from app.monitoring.alerts import AlertsSpec
    from app.monitoring.loop import RetrainingSpec

    spec = _validated(MonitorSpec, body, "")
    alerts = _validated(AlertsSpec, spec.alerts, "alerts.")
    retraining = _validated(RetrainingSpec, spec.retraining, "retraining.") if spec.retraining is not None else None
    return spec, alerts, retraining

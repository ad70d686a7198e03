"""What an A/B test is (``POST /v1/abtests``): the endpoint whose traffic plan splits the
requests, the primary metric and the test that judges it, guardrails, and the error rates the
experimenter accepts.

A metric is *binary* (one 0/1 outcome per prediction: conversion, accuracy, error_rate) or
*continuous* (value, rmse as the squared error of each prediction, latency), and each method
fits one kind or both; a spec that pairs them wrongly is refused here (422) rather than
analysed with a test whose assumptions it breaks.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METRICS = ("conversion", "value", "accuracy", "rmse", "latency", "error_rate")
BINARY_METRICS = frozenset({"conversion", "accuracy", "error_rate"})
CONTINUOUS_METRICS = frozenset({"value", "rmse", "latency"})
# Metrics where a smaller number is the better one: a treatment "wins" by lowering them.
LOWER_IS_BETTER = frozenset({"rmse", "latency", "error_rate"})
METHODS = ("z_test", "welch", "mann_whitney", "msprt", "bayesian")
FIXED_HORIZON = frozenset({"z_test", "welch", "mann_whitney"})
METHODS_FOR = {
    "binary": ("z_test", "msprt", "bayesian"),
    "continuous": ("welch", "mann_whitney", "msprt", "bayesian"),
}
# A guardrail is judged by a p-value (Holm-corrected with the primary's), so not Bayesian.
GUARDRAIL_METHODS = ("z_test", "welch", "mann_whitney", "msprt")
MAX_GUARDRAILS = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:-]{0,127}$")

Metric = Literal["conversion", "value", "accuracy", "rmse", "latency", "error_rate"]
Method = Literal["z_test", "welch", "mann_whitney", "msprt", "bayesian"]


def metric_kind(metric: str) -> Literal["binary", "continuous"]:
    """``binary`` for the 0/1 metrics, ``continuous`` for the others."""
    return "binary" if metric in BINARY_METRICS else "continuous"


def default_guardrail_method(metric: str) -> str:
    """The fixed-horizon test that fits a guardrail metric when the spec names none: the
    two-proportion z-test for 0/1 outcomes, Mann-Whitney for latency (skewed, heavy-tailed),
    Welch's t-test for the other continuous metrics."""
    if metric in BINARY_METRICS:
        return "z_test"
    return "mann_whitney" if metric == "latency" else "welch"


def _check_method(metric: str, method: str, field: str) -> None:
    allowed = METHODS_FOR[metric_kind(metric)]
    if method not in allowed:
        raise ValueError(
            f"{field} {method!r} does not fit the {metric_kind(metric)} metric {metric!r}; use one of "
            f"{', '.join(allowed)}"
        )


class GuardrailSpec(BaseModel):
    """A metric the treatment must not make significantly worse, whatever the primary says."""

    model_config = ConfigDict(extra="forbid")

    metric: Metric = Field(..., description="The guardrail metric (same choices as the primary metric).")
    method: Literal["z_test", "welch", "mann_whitney", "msprt"] | None = Field(
        None, description="Its test; unset = z_test for binary metrics, mann_whitney for latency, welch otherwise."
    )
    direction: Literal["increase_is_bad", "decrease_is_bad"] | None = Field(
        None, description="Which change fails the guardrail; unset = increase_is_bad for rmse, latency and "
        "error_rate, decrease_is_bad for the others.",
    )

    @model_validator(mode="after")
    def _fill(self) -> GuardrailSpec:
        if self.method is None:
            self.method = default_guardrail_method(self.metric)  # type: ignore[assignment]
        _check_method(self.metric, self.method, "guardrail method")
        if self.direction is None:
            self.direction = "increase_is_bad" if self.metric in LOWER_IS_BETTER else "decrease_is_bad"
        return self


class ABTestSpec(BaseModel):
    """An A/B(/N) test on an endpoint's traffic plan: each variant of the plan is an arm."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="A name for people (1-128 letters, digits, spaces, _ . : -).")
    endpoint: str = Field(..., min_length=1, max_length=128,
                          description="The endpoint whose traffic plan (PUT /v1/endpoints/{name}/traffic) splits requests.")
    metric: Metric = Field(
        ..., description="The primary metric: conversion (feedback reward > 0, or value > 0 without a reward), "
        "value (feedback value, or reward), accuracy (prediction equals the label), rmse (squared error of the "
        "prediction against the feedback value or numeric label), latency (ms, every request), error_rate "
        "(status >= 500, every request).",
    )
    method: Method = Field(
        ..., description="The test: z_test (two proportions), welch (Welch's t), mann_whitney (Mann-Whitney U) "
        "are fixed-horizon, read them once at the planned sample size; msprt (mixture sequential probability "
        "ratio test) is safe to read at any time; bayesian gives each arm's probability to be best and its "
        "expected loss. Binary metrics take z_test, msprt or bayesian; continuous ones welch, mann_whitney, "
        "msprt or bayesian.",
    )
    control: str | None = Field(None, description="The control variant; unset = the first variant of the plan.")
    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="The false positive rate (two-sided), over all arms and "
                         "metrics together (Holm's correction).")
    power: float = Field(0.8, gt=0.5, lt=1.0, description="The chance to detect an effect of size mde (the sample-size calculator).")
    mde: float | None = Field(None, gt=0.0, description="The minimum detectable effect, absolute, in the metric's "
                              "unit (0.01 = one percentage point of conversion); enables the sample-size calculator.")
    baseline: float | None = Field(
        None, gt=0.0, description="For the sample-size calculator: the control's expected rate (binary metrics, "
        "0 < p < 1) or the metric's standard deviation (continuous); unset = estimated from the control's data.",
    )
    min_samples_per_arm: int = Field(100, ge=2, le=10**9, description="No verdict before every arm has this many samples.")
    guardrails: list[GuardrailSpec] = Field(default_factory=list, max_length=MAX_GUARDRAILS,
                                            description="Metrics the treatment must not make significantly worse.")
    expected_samples_per_arm: int | None = Field(
        None, ge=2, le=10**9, description="The sample size per arm the mSPRT mixture is tuned to (its tau: "
        "most power near this n); unset = the sample-size calculator's when mde is set, else 10 x min_samples_per_arm.",
    )
    since: datetime | None = Field(None, description="Start of the analysed window (ISO 8601); unset = the test's creation.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-128 letters, digits, spaces, '_', '.', ':' or '-', starting with a letter or digit")
        return value

    @field_validator("since")
    @classmethod
    def _since(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _fits(self) -> ABTestSpec:
        _check_method(self.metric, self.method, "method")
        if self.baseline is not None and self.metric in BINARY_METRICS and not 0.0 < self.baseline < 1.0:
            raise ValueError(f"baseline {self.baseline} is the control's rate for a binary metric: between 0 and 1")
        if self.mde is not None and self.metric in BINARY_METRICS and self.mde >= 1.0:
            raise ValueError(f"mde {self.mde} is a difference of two rates for a binary metric: below 1")
        return self

    @property
    def kind(self) -> Literal["binary", "continuous"]:
        return metric_kind(self.metric)

"""What ``POST /v1/rollouts`` takes: the endpoint, the candidate, the steps and the guardrails
that judge each step (:mod:`app.rollouts.judge`).

The defaults of the latency floors make "5 -> 10 ms" pass (a 5 ms shift is under the 10 ms
absolute floor) while "50 -> 75 ms" and "+20 ms" fail (over both floors): a regression counts
only when it is significant AND larger than both floors (Kayenta's lesson, spinnaker/kayenta#674:
a significance test alone flags harmless shifts on fast services)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

QUALITY_METRICS = ("conversion", "value", "accuracy", "rmse")
# Whether a larger value of the metric is better (rmse: the judge compares squared errors).
HIGHER_IS_BETTER = {"conversion": True, "value": True, "accuracy": True, "rmse": False}


class QualitySpec(BaseModel):
    """The business or quality metric from feedback, judged with mSPRT (always-valid p-values,
    Johari et al. 2017), so it can be read at every tick without inflating false alarms."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["conversion", "value", "accuracy", "rmse"] = Field(
        ..., description="conversion: feedback reward 0/1; value: feedback reward (any number); accuracy: "
        "prediction == feedback label; rmse: (prediction - feedback value)^2, lower is better.",
    )
    required: bool = Field(
        False, description="Passing a step also needs min_samples labeled predictions per arm. Off by default: "
        "feedback may arrive long after the step, so the metric can fail a step but does not hold it back.",
    )
    expected_n: int | None = Field(
        None, ge=2, description="Labeled samples per arm the mixture variance tau^2 is tuned to; default min_samples.",
    )


class RolloutSpec(BaseModel):
    """A canary rollout of ``candidate`` on ``endpoint``."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(..., min_length=1, max_length=128, description="The endpoint to roll out on.")
    candidate: str = Field(
        ..., min_length=1, max_length=256,
        description="The new version: a version of the endpoint's model ('7'), or a target of that model "
        "('churn/7', 'churn@challenger', resolved once, at creation).",
    )
    baseline: str | None = Field(
        None, max_length=256, description="The version compared against; default: the version the endpoint's "
        "target resolves to now.",
    )
    steps: list[float] = Field(
        default_factory=lambda: [5.0, 25.0, 50.0, 100.0],
        description="Candidate traffic shares in percent, increasing, the last 100. Every step below 100 is "
        "judged; reaching 100 is the promotion.",
    )
    bake_s: float = Field(60.0, ge=0, le=86_400, description="Least seconds each step runs before it may pass.")
    min_samples: int = Field(100, ge=1, le=10_000_000, description="Least requests per arm before a step may pass.")
    max_step_s: float = Field(
        1800.0, gt=0, le=7 * 86_400,
        description="Longest a step waits for min_samples (or bake time); then on_timeout happens.",
    )
    on_timeout: Literal["pause", "rollback"] = Field(
        "pause", description="When a step runs past max_step_s without enough samples: pause (the split stays; "
        "resume starts the step's window again) or rollback.",
    )
    alpha: float = Field(0.05, gt=0, lt=0.5, description="Significance level of every guardrail test.")
    latency_rel_floor: float = Field(
        0.2, ge=0, le=100, description="A latency regression counts only above this share of the baseline's "
        "median (0.2 = +20%) ...",
    )
    latency_abs_floor_ms: float = Field(
        10.0, ge=0, le=600_000, description="... and above this many milliseconds (Hodges-Lehmann shift).",
    )
    error_rate_floor: float = Field(
        0.0, ge=0, le=1, description="An error-rate increase counts only above this absolute difference "
        "(0.01 = one percentage point).",
    )
    quality: QualitySpec | None = Field(None, description="The metric from feedback; unset = none.")

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[float]) -> list[float]:
        if len(value) < 2:
            raise ValueError("give at least one step below 100, then 100 (e.g. [5, 25, 50, 100])")
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"steps must increase strictly; got {value}")
        if value[0] <= 0 or value[-1] != 100:
            raise ValueError(f"steps must be above 0 and end at 100; got {value}")
        return [float(v) for v in value]

    @model_validator(mode="after")
    def _check(self) -> RolloutSpec:
        if self.baseline is not None and self.baseline == self.candidate:
            raise ValueError("baseline and candidate are the same")
        return self

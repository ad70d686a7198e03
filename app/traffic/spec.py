"""An endpoint's traffic plan (``PUT /v1/endpoints/{name}/traffic``), stored as ``traffic`` in
the endpoint's spec (:class:`app.serving.endpoint_spec.EndpointSpec`), so changing it reloads
nothing and every Gateway replica sees it at once (the change feed pushes the endpoint).

Without a plan an endpoint serves its ``target`` alone (variant ``""``)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRATEGIES = ("fixed", "thompson", "epsilon_greedy", "ucb1")
BANDITS = STRATEGIES[1:]
STICKY_HEADER = "X-Matih-Sticky"
VARIANT_HEADER = "X-Matih-Variant"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_VARIANTS = 16
MAX_SHADOWS = 4


class VariantSpec(BaseModel):
    """One variant of the split: a model target served to ``weight`` of the traffic."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="The variant's name (letters, digits, _ . -; at most 64), reported with every answer.")
    target: str = Field(..., max_length=512, description="What it serves: model@alias, model/version or model@stage:Production.")
    weight: float = Field(..., ge=0, le=100, description="Its share of the traffic, relative to the other variants' (90 and 10 = 90%/10%).")
    runtime: str | None = Field(
        None, description="The runtime (onnx | native | triton); unset = the endpoint's runtime and config."
    )
    config: dict[str, Any] | None = Field(None, description="The runtime's config when `runtime` is set.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return value


class StickySpec(BaseModel):
    """Sticky assignment: the same key always gets the same variant (while the weights hold)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(
        ..., min_length=1, max_length=64,
        description="The request field beside `instances` whose value is the key (e.g. customer_id); the "
        f"{STICKY_HEADER} header, when sent, wins over it.",
    )


class ShadowSpec(BaseModel):
    """A target that gets a sampled copy of the traffic off the request path; its answers are
    logged and compared with the primary's (``GET /v1/endpoints/{name}/shadow/report``)."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(..., max_length=512, description="The shadow model target.")
    sample: float = Field(1.0, ge=0.0, le=1.0, description="Share of requests copied to it.")
    name: str | None = Field(None, description="Its name in the log and the report; unset = the target.")
    runtime: str | None = Field(None, description="The runtime; unset = the endpoint's runtime and config.")
    config: dict[str, Any] | None = Field(None, description="The runtime's config when `runtime` is set.")

    @property
    def label(self) -> str:
        return self.name or self.target


class BanditSpec(BaseModel):
    """How a bandit strategy learns from ``/feedback`` rewards."""

    model_config = ConfigDict(extra="forbid")

    reward: Literal["binary", "continuous"] = Field(
        "binary", description="binary: rewards are 0/1 (Beta-Bernoulli posteriors); continuous: any number (Normal)."
    )
    floor: float = Field(0.01, ge=0.0, le=0.5, description="The least share of traffic every arm keeps.")
    epsilon: float = Field(0.1, gt=0.0, le=1.0, description="epsilon_greedy: the share explored uniformly.")


class TrafficSpec(BaseModel):
    """A traffic plan: variants with weights, optional stickiness, shadows and a strategy."""

    model_config = ConfigDict(extra="forbid")

    variants: list[VariantSpec] = Field(..., min_length=1, max_length=MAX_VARIANTS)
    sticky: StickySpec | None = None
    shadows: list[ShadowSpec] = Field(default_factory=list, max_length=MAX_SHADOWS)
    strategy: Literal["fixed", "thompson", "epsilon_greedy", "ucb1"] = Field(
        "fixed", description="fixed: the weights as given; a bandit moves traffic to the arm with the best rewards."
    )
    bandit: BanditSpec = Field(default_factory=BanditSpec)

    @model_validator(mode="after")
    def _check(self) -> TrafficSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        if self.strategy == "fixed" and sum(v.weight for v in self.variants) <= 0:
            raise ValueError("the variants' weights must not all be 0")
        if self.strategy != "fixed" and len(self.variants) < 2:
            raise ValueError(f"strategy {self.strategy!r} needs at least two variants")
        if self.strategy != "fixed" and self.bandit.floor * len(self.variants) > 1.0:
            raise ValueError("bandit.floor times the number of variants must not exceed 1")
        labels = [s.label for s in self.shadows]
        if len(set(labels)) != len(labels):
            raise ValueError("shadow names (or targets) must be unique")
        return self

    def weights(self) -> dict[str, float]:
        """The configured shares, normalized to sum to 1."""
        total = sum(v.weight for v in self.variants) or 1.0
        return {v.name: v.weight / total for v in self.variants}

"""Request and response bodies of the HTTP API, and the training job spec.

Every field is documented here, where it is declared; the OpenAPI schema at /docs is built
from these models.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must start with a letter or digit and hold only letters, digits, '_', '.', '-' "
            "(at most 128 characters)"
        )
    return value


def check_runtime(value: str) -> str:
    from app.runtimes.base import RUNTIMES

    if value not in RUNTIMES:
        raise ValueError(f"runtime {value!r} is unknown; available: {', '.join(sorted(RUNTIMES))}")
    return value


# -- training -------------------------------------------------------------------------------
class DatasetSpec(_Strict):
    uri: str = Field(
        ...,
        description="builtin://<name> for a dataset shipped with scikit-learn (iris, wine, breast_cancer, "
        "diabetes, digits), or a local .parquet / .csv path (file:// accepted).",
        examples=["builtin://iris"],
    )
    target: str = Field(..., description="Column holding the label.", examples=["target"])
    features: list[str] | None = Field(None, description="Feature columns; default: every column but the target.")
    test_size: float = Field(0.2, gt=0, lt=1, description="Share of rows held out for validation and parity checks.")
    seed: int = Field(42, description="Seed of the train/holdout split.")


class ResourceSpec(_Strict):
    num_cpus: float | None = Field(None, gt=0, description="CPUs for the job; default: settings.jobs.num_cpus.")
    num_gpus: float = Field(0, ge=0, description="GPUs for the job (fractions allowed).")


class TrainingJobSpec(_Strict):
    """What ``POST /v1/training/jobs`` takes."""

    name: str = Field(..., description="Job and MLflow run name.", examples=["iris-logreg"])
    framework: Literal["sklearn"] = Field(
        "sklearn", description="Training framework. Only 'sklearn' in this release."
    )
    estimator: str = Field(
        ...,
        description="Import path of a scikit-learn estimator from settings.jobs.allowed_estimators.",
        examples=["sklearn.linear_model.LogisticRegression"],
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the estimator.", examples=[{"max_iter": 300}]
    )
    dataset: DatasetSpec
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    register_as: str | None = Field(
        None, description="Registered model name; the first version gets the alias 'champion'.", examples=["iris"]
    )
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first among queued jobs.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "name")

    @field_validator("register_as")
    @classmethod
    def _register_as(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "register_as")


class JobAccepted(BaseModel):
    job_id: str
    status: str


class JobView(BaseModel):
    job_id: str
    kind: str
    name: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    priority: int
    spec: dict[str, Any]
    result: dict[str, Any]
    progress: dict[str, Any]
    error: str | None
    attempts: int
    created_by: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    logs: str | None = None


class Page(BaseModel):
    items: list[dict[str, Any]]
    next_page_token: str | None = None


# -- endpoints and prediction ---------------------------------------------------------------
class EndpointCreate(_Strict):
    name: str = Field(..., description="Endpoint name, used in /v1/endpoints/{name}/predict.", examples=["iris"])
    target: str = Field(
        ...,
        description="What the endpoint serves: 'model@alias', 'model/version', or models:/ forms of either.",
        examples=["iris@champion"],
    )
    runtime: str = Field("onnx", description="Inference runtime: a name in app.runtimes.base.RUNTIMES.")
    config: dict[str, Any] = Field(default_factory=dict, description="Runtime options, kept with the endpoint.")

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str) -> str:
        return check_runtime(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "endpoint name")


class EndpointUpdate(_Strict):
    target: str | None = Field(None, description="New target; the next request uses it, nothing redeploys.")
    runtime: str | None = Field(None, description="New runtime (a name in app.runtimes.base.RUNTIMES).")
    config: dict[str, Any] | None = None

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str | None) -> str | None:
        return None if v is None else check_runtime(v)


class PredictRequest(_Strict):
    instances: list[Any] | None = Field(
        None,
        description="Rows: lists of feature values in model order, or objects keyed by feature name.",
        examples=[[[5.1, 3.5, 1.4, 0.2]]],
    )
    inputs: dict[str, list[Any]] | None = Field(
        None, description="Columns: feature name -> values (all of one length)."
    )
    return_probabilities: bool = Field(False, description="Add class probabilities for classifiers.")


class PredictResponse(BaseModel):
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    model: str
    model_version: str
    endpoint: str
    request_id: str


class TokenCreate(_Strict):
    name: str = Field(..., description="Who or what the token is for.")
    role: Literal["viewer", "predictor", "developer", "admin"]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "token name")

"""The training job spec: one pydantic model, taken as JSON by ``POST /v1/training/jobs`` and
as YAML by ``python -m app.jobs.run --spec FILE``.

Every field is documented where it is declared (the OpenAPI schema at /docs is built from
these models). Checks that need only the spec live here as validators, so a bad spec is a 422
naming the field; checks that need the settings or the cluster (the estimator allow-list,
GPUs) live in ``check_spec`` and the scheduler.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.names import check_name

Strategy = Literal["single", "data_parallel", "model_parallel", "pipeline_parallel"]
STRATEGIES: tuple[str, ...] = ("single", "data_parallel", "model_parallel", "pipeline_parallel")
TORCH_MODELS: tuple[str, ...] = ("mlp", "cnn", "tab_transformer")
CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "f1", "roc_auc", "log_loss")
REGRESSION_METRICS: tuple[str, ...] = ("rmse", "mae", "r2")
#: Metrics where lower is better; every other gate metric is better when higher.
LOWER_IS_BETTER: frozenset[str] = frozenset({"log_loss", "rmse", "mae", "loss", "val_loss"})
SEARCH_KINDS: tuple[str, ...] = ("uniform", "loguniform", "choice", "randint", "grid")
TUNE_SCHEDULERS: tuple[str, ...] = ("asha", "median", "pbt")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitSpec(_Strict):
    test_size: float = Field(0.2, gt=0, lt=1, description="Share of rows held out for validation, gates and parity.")
    seed: int = Field(42, description="Seed of the train/holdout split (stratified for classification).")


class DatasetSpec(_Strict):
    uri: str = Field(
        ...,
        description="builtin://<name> for a dataset shipped with scikit-learn (iris, wine, breast_cancer, "
        "diabetes, digits), a .parquet / .csv path (file:// accepted), an s3:// URI, or "
        "feast://<feature_service>?entities=<parquet> for a point-in-time set of a Feast feature service.",
        examples=["builtin://iris"],
    )
    target: str = Field(..., description="Column holding the label.", examples=["target"])
    features: list[str] | None = Field(None, description="Feature columns; default: every column but the target.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the holdout is cut.")
    # Kept for specs written before `split` existed: they mean split.test_size / split.seed.
    test_size: float | None = Field(None, gt=0, lt=1, description="Deprecated alias of split.test_size.")
    seed: int | None = Field(None, description="Deprecated alias of split.seed.")

    @model_validator(mode="after")
    def _legacy_split(self) -> DatasetSpec:
        if self.test_size is not None:
            self.split.test_size = self.test_size
        if self.seed is not None:
            self.split.seed = self.seed
        return self


class TorchModelSpec(_Strict):
    """A model of the built-in zoo; the input width and output size come from the dataset."""

    kind: Literal["mlp", "cnn", "tab_transformer"] = Field(
        "mlp", description="mlp: fully connected layers; cnn: a small 2-D convnet over image-shaped rows "
        "(e.g. builtin://digits as 1x8x8); tab_transformer: a transformer encoder over feature tokens."
    )
    hidden: list[int] = Field([64, 64], min_length=1, description="mlp: widths of the hidden layers.")
    channels: list[int] = Field([8, 16], min_length=1, description="cnn: output channels of each conv layer.")
    image_shape: list[int] | None = Field(
        None, min_length=3, max_length=3,
        description="cnn: (channels, height, width) of one row; default: 1 x n x n for n*n features.",
    )
    d_model: int = Field(32, ge=4, description="tab_transformer: embedding width (a multiple of heads).")
    heads: int = Field(4, ge=1, description="tab_transformer: attention heads.")
    layers: int = Field(2, ge=1, description="tab_transformer: encoder layers.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout between layers.")

    @model_validator(mode="after")
    def _shape(self) -> TorchModelSpec:
        if self.kind == "tab_transformer" and self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if any(h < 1 for h in self.hidden + self.channels):
            raise ValueError("hidden sizes and channels must be >= 1")
        return self


class ResourcesSpec(_Strict):
    num_workers: int = Field(1, ge=1, le=256, description="Ray Train workers (processes). 1 for strategy single.")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each worker reserves; default: settings.jobs.num_cpus / num_workers."
    )
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker reserves (fractions allowed).")
    # Kept for specs written before num_workers existed (one worker): num_cpus -> cpus_per_worker.
    num_cpus: float | None = Field(None, gt=0, description="Deprecated: CPUs of a one-worker job.")
    num_gpus: float | None = Field(None, ge=0, description="Deprecated: GPUs of a one-worker job.")

    @model_validator(mode="after")
    def _legacy(self) -> ResourcesSpec:
        if self.num_cpus is not None and self.cpus_per_worker is None:
            self.cpus_per_worker = self.num_cpus
        if self.num_gpus is not None and not self.gpus_per_worker:
            self.gpus_per_worker = self.num_gpus
        return self

    def cpus(self, default_total: float) -> float:
        """CPUs per worker, the job default split across the workers when not given."""
        return self.cpus_per_worker or max(0.05, default_total / self.num_workers)

    def totals(self, default_total: float) -> dict[str, float]:
        """What the whole job reserves: {"CPU": ..., "GPU": ...}."""
        return {"CPU": self.cpus(default_total) * self.num_workers, "GPU": self.gpus_per_worker * self.num_workers}


EPOCH_METRICS: tuple[str, ...] = ("val_loss", "train_loss", "accuracy", "f1", "log_loss", "rmse", "mae", "r2")


class CheckpointSpec(_Strict):
    frequency: int = Field(1, ge=1, description="Save a checkpoint every N epochs (torch jobs); the last epoch always.")
    keep_best: int = Field(2, ge=1, description="How many checkpoints to keep, the best by `metric` (and the latest).")
    metric: str = Field(
        "val_loss", description="Metric that ranks checkpoints, one reported each epoch: " + ", ".join(EPOCH_METRICS)
    )
    mode: Literal["min", "max"] = Field("min", description="Whether a lower or a higher `metric` is better.")
    storage_path: str | None = Field(
        None, description="Local path or s3:// URI for Ray Train results; default: settings.jobs.storage_path."
    )
    resume_from: str | None = Field(
        None, description="A checkpoint path (as listed by GET .../checkpoints) to start from; set by POST .../resume."
    )

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in EPOCH_METRICS:
            raise ValueError(f"checkpoint metric {v!r} is not reported each epoch; use one of {', '.join(EPOCH_METRICS)}")
        return v


class FailureSpec(_Strict):
    max_failures: int = Field(
        0, ge=0, le=100, description="Worker failures survived by restarting from the last checkpoint."
    )


class Gate(_Strict):
    """One validation gate: exactly one of min, max, beat_champion_by."""

    metric: str = Field(..., description="A holdout metric: " + ", ".join(CLASSIFICATION_METRICS + REGRESSION_METRICS))
    min: float | None = Field(None, description="The metric must be >= this.")
    max: float | None = Field(None, description="The metric must be <= this.")
    beat_champion_by: float | None = Field(
        None, ge=0, description="The metric must beat the current champion's on the same holdout by this margin "
        "(higher for accuracy-like metrics, lower for losses and errors). Passes when there is no champion."
    )

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        allowed = CLASSIFICATION_METRICS + REGRESSION_METRICS
        if v not in allowed:
            raise ValueError(f"metric {v!r} is unknown; allowed: {', '.join(allowed)}")
        return v

    @model_validator(mode="after")
    def _one(self) -> Gate:
        given = [k for k in ("min", "max", "beat_champion_by") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a gate takes exactly one of min, max, beat_champion_by (got {given or 'none'})")
        return self


class ValidationSpec(_Strict):
    gates: list[Gate] = Field(default_factory=list, description="All must pass for the model to be registered.")
    compare_with: str = Field("champion", description="Alias of the version the new one is compared with.")
    alias_on_pass: str = Field(
        "challenger", description="Alias a passing version gets when a champion exists (else it becomes champion)."
    )


class SearchDim(_Strict):
    """One dimension of a search space: exactly one key."""

    uniform: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high]")
    loguniform: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high], low > 0")
    choice: list[Any] | None = Field(None, min_length=1, description="values sampled at random")
    randint: list[int] | None = Field(None, min_length=2, max_length=2, description="[low, high) integers")
    grid: list[Any] | None = Field(None, min_length=1, description="every value, each in num_samples trials")

    @model_validator(mode="after")
    def _one(self) -> SearchDim:
        given = [k for k in SEARCH_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a search dimension takes exactly one of {', '.join(SEARCH_KINDS)} (got {given or 'none'})")
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind}: low must be < high (got {low}, {high})")
            if kind == "loguniform" and low <= 0:
                raise ValueError("loguniform: low must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SEARCH_KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> list[Any]:
        return getattr(self, self.kind)


class TuneSpec(_Strict):
    search_space: dict[str, SearchDim] = Field(
        ..., min_length=1,
        description="Hyperparameter name -> one of {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {choice: [...]}, "
        "{randint: [lo, hi]}, {grid: [...]}. Sampled values override `hyperparameters`.",
        examples=[{"C": {"loguniform": [0.01, 10]}, "max_iter": {"choice": [100, 300]}}],
    )
    num_samples: int = Field(8, ge=1, le=1000, description="Trials (times the grid size when a grid is given).")
    metric: str = Field("accuracy", description="Holdout metric each trial reports and the search optimises.")
    mode: Literal["min", "max"] = Field("max", description="Whether the metric is minimised or maximised.")
    scheduler: Literal["asha", "median", "pbt"] | None = Field(
        None, description="Early stopping or population-based training; none runs every trial to its end."
    )
    max_concurrent: int = Field(2, ge=1, le=64, description="Trials running at once.")
    cpus_per_trial: float = Field(0.5, gt=0, description="CPUs each trial reserves.")


class TrainingJobSpec(_Strict):
    """What ``POST /v1/training/jobs`` takes."""

    name: str = Field(..., description="Job and MLflow run name.", examples=["iris-logreg"])
    framework: Literal["sklearn", "torch"] = Field(
        "sklearn", description="sklearn: an estimator from the allow-list; torch: a model of the built-in zoo."
    )
    estimator: str | None = Field(
        None,
        description="sklearn: import path of an estimator from settings.jobs.allowed_estimators.",
        examples=["sklearn.linear_model.LogisticRegression"],
    )
    model: TorchModelSpec | None = Field(None, description="torch: the zoo model and its shape.")
    task: Literal["auto", "classification", "regression"] = Field(
        "auto", description="torch: auto is classification for integer or string targets with few values."
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="sklearn: keyword arguments of the estimator. torch: epochs, lr, batch_size, optimizer "
        "(adam, sgd), weight_decay, microbatches (pipeline_parallel), seed, epoch_sleep_s (testing only).",
        examples=[{"max_iter": 300}],
    )
    dataset: DatasetSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    strategy: Strategy = Field(
        "single",
        description="single: one process; data_parallel: DDP; model_parallel: FSDP shards the model; "
        "pipeline_parallel: the model cut into stages (torch.distributed.pipelining). All but single need torch.",
    )
    tune: TuneSpec | None = Field(None, description="Run a Ray Tune search; the best trial is validated and registered.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    register_as: str | None = Field(
        None, description="Registered model name; the first version becomes 'champion', later passing ones "
        "'challenger'.", examples=["iris"],
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

    @model_validator(mode="after")
    def _consistent(self) -> TrainingJobSpec:
        if self.framework == "sklearn":
            if not self.estimator:
                raise ValueError("framework 'sklearn' needs `estimator` (an import path from the allow-list)")
            if self.model is not None:
                raise ValueError("`model` is for framework 'torch'; sklearn jobs name an `estimator`")
            if self.strategy != "single":
                raise ValueError(f"strategy {self.strategy!r} needs framework 'torch'; sklearn jobs are 'single'")
            if self.resources.num_workers != 1:
                raise ValueError("sklearn jobs run one worker (resources.num_workers = 1)")
        else:
            if self.estimator:
                raise ValueError("`estimator` is for framework 'sklearn'; torch jobs name a `model`")
            if self.model is None:
                self.model = TorchModelSpec()
            if self.strategy == "single" and self.resources.num_workers != 1:
                raise ValueError("strategy 'single' runs one worker; use data_parallel, model_parallel or "
                                 "pipeline_parallel for num_workers > 1")
            if self.strategy == "pipeline_parallel":
                if self.model.kind != "mlp":
                    raise ValueError("pipeline_parallel splits an mlp into stages; set model.kind to 'mlp'")
                if self.resources.num_workers > len(self.model.hidden) + 1:
                    raise ValueError(
                        f"pipeline_parallel with {self.resources.num_workers} workers needs at least "
                        f"{self.resources.num_workers - 1} hidden layers (one stage per worker)"
                    )
            bad = [k for k in self.hyperparameters if k not in TORCH_HYPERPARAMETERS]
            if self.tune is not None:
                bad += [k for k in self.tune.search_space if k not in TORCH_HYPERPARAMETERS]
            if bad:
                raise ValueError(f"unknown torch hyperparameters {bad}; allowed: {', '.join(TORCH_HYPERPARAMETERS)}")
            try:
                TorchHyperparameters.model_validate(self.hyperparameters)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"hyperparameters.{where}: {first['msg']}") from None
        if self.tune is not None and self.strategy != "single":
            raise ValueError("a tune block runs single-process trials; set strategy to 'single'")
        return self

    def torch_hparams(self) -> TorchHyperparameters:
        return TorchHyperparameters.model_validate(self.hyperparameters)


class TorchHyperparameters(_Strict):
    epochs: int = Field(5, ge=1, le=10_000)
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    microbatches: int = Field(2, ge=1, description="pipeline_parallel: microbatches per batch.")
    seed: int = 0
    epoch_sleep_s: float = Field(0.0, ge=0, le=60, description="Sleep after each epoch; for tests that kill workers.")

    @field_validator("lr")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("lr must be finite")
        return v


TORCH_HYPERPARAMETERS: tuple[str, ...] = tuple(TorchHyperparameters.model_fields)


def check_spec_paths(spec: TrainingJobSpec, settings) -> TrainingJobSpec:
    """The spec with ``dataset.uri``, ``checkpoint.storage_path`` and ``checkpoint.resume_from``
    confined to the data roots (``settings.storage``) and made canonical; 422 naming the field
    otherwise. Checked at submission and again when the job starts."""
    from app.storage.paths import check_job_location

    dataset, checkpoint = spec.dataset, spec.checkpoint
    updates: dict[str, Any] = {}
    if dataset.uri.startswith("feast://"):
        from app.features.jobs import check_feast_uri

        updates["dataset"] = dataset.model_copy(update={"uri": check_feast_uri(dataset.uri, settings)})
    elif not dataset.uri.startswith("builtin://"):
        uri = check_job_location(dataset.uri, settings, "dataset.uri")
        updates["dataset"] = dataset.model_copy(update={"uri": uri})
    paths = {
        key: check_job_location(getattr(checkpoint, key), settings, f"checkpoint.{key}", checkpoints=True)
        for key in ("storage_path", "resume_from")
        if getattr(checkpoint, key) is not None
    }
    if paths:
        updates["checkpoint"] = checkpoint.model_copy(update=paths)
    return spec.model_copy(update=updates) if updates else spec

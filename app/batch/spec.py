"""What ``POST /v1/batch/jobs`` takes; stored as the job's spec and read back by the runner."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.schemas import ResourceSpec, check_name

FORMATS = ("parquet", "csv")
Format = Literal["parquet", "csv"]


class BatchJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        ...,
        description="Registered model to run: 'name@alias', 'name/version' or a models:/ URI. Resolved when the "
        "job starts (the version used is in the job's progress and result); archived versions are refused.",
        examples=["iris@champion"],
    )
    input_uri: str = Field(
        ...,
        description="A parquet or CSV file, or a folder of them: a local path (file:// accepted) or s3://bucket/key "
        "(read with the platform's S3 settings).",
        examples=["s3://data/iris/scoring.parquet"],
    )
    output_uri: str = Field(
        ...,
        description="Folder to write into (local or s3://); it must be empty or absent. Files are named "
        "part-<job>-<n>.<format>, and read in name order they hold the rows in input order.",
        examples=["s3://data/iris/predictions/"],
    )
    format: Format = Field("parquet", description="Output format: parquet or csv.")
    input_format: Format | None = Field(
        None, description="Input format; default: from the input's suffix (.parquet, .pq, .csv)."
    )
    feature_columns: list[str] | None = Field(
        None,
        min_length=1,
        description="Input columns fed to the model, in model order; default: the feature names recorded with "
        "the version at training (matih.feature_names), else every numeric column but key and passthrough ones.",
    )
    key_column: str | None = Field(
        None, description="An input column copied to the output first, to join predictions back to their rows."
    )
    passthrough_columns: list[str] = Field(
        default_factory=list, description="Further input columns copied unchanged to the output."
    )
    return_probabilities: bool = Field(
        False,
        description="Add class probabilities (classifiers): a list column 'probabilities' in parquet, one column "
        "'probability_<class>' per class in CSV.",
    )
    batch_size: int | None = Field(
        None, gt=0, le=1_000_000, description="Rows per predictor call; default settings.batch.batch_size."
    )
    concurrency: int | None = Field(
        None, ge=1, le=256, description="Predictor actors (one model session each); default settings.batch.concurrency."
    )
    num_cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each predictor actor reserves; default settings.batch.worker_num_cpus."
    )
    num_gpus_per_worker: float = Field(
        0, ge=0, description="GPUs each predictor actor reserves (fractions allowed); ONNX Runtime then uses CUDA."
    )
    resources: ResourceSpec = Field(
        default_factory=ResourceSpec,
        description="Resources of the job's own task, which plans and watches the pipeline; default "
        "settings.batch.driver_num_cpus CPUs. The predictors are sized by the *_per_worker fields.",
    )
    name: str | None = Field(None, description="Job name; default 'batch-<model name>'.")
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first among queued jobs.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "name")

    @field_validator("input_uri", "output_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _columns(self) -> BatchJobSpec:
        taken = ["prediction", "probabilities"]
        for col in [self.key_column, *self.passthrough_columns]:
            if col is not None and (col in taken or col.startswith("probability_")):
                raise ValueError(
                    f"column {col!r} is named twice or clashes with an output column "
                    "(prediction, probabilities, probability_*)"
                )
            if col is not None:
                taken.append(col)
        return self


def check_spec_paths(spec: BatchJobSpec, settings) -> BatchJobSpec:
    """The spec with ``input_uri`` and ``output_uri`` confined to the data roots
    (``settings.storage``) and made canonical; 422 naming the field otherwise. Checked at
    submission and again when the job starts, before anything is read."""
    from app.storage.paths import check_job_location

    return spec.model_copy(update={
        "input_uri": check_job_location(spec.input_uri, settings, "input_uri"),
        "output_uri": check_job_location(spec.output_uri, settings, "output_uri"),
    })

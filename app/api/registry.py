"""The registry routes (``/v1/models``, ``/v1/experiments``, ``/v1/runs``) over
:class:`app.registry.service.RegistryService`. Reads need viewer, writes developer,
``approve`` and ``trust`` admin. After any change to a model's versions, aliases or stages
the route calls ``ctx.notify_model_changed`` so every gateway replica drops its cached
resolutions at once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.api.errors import validation_error
from app.auth import Principal
from app.errors import BadRequest, InvalidInput
from app.registry.formats import FORMATS, Hints
from app.registry.service import RegistryService, card_markdown, endpoints_using
from app.schemas import Page


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCreate(_Strict):
    name: str = Field(..., description="Registered model name.", examples=["iris"])
    description: str = Field("", description="What the model is for; shown in MLflow.")
    tags: dict[str, str] = Field(default_factory=dict, description="Free tags (not 'matih.' or 'mlflow.').")


class ModelUpdate(_Strict):
    description: str | None = Field(None, description="New description.")
    tags: dict[str, str] | None = Field(None, description="Tags to set (not 'matih.' or 'mlflow.').")


class VersionCreate(_Strict):
    """Register a version from exactly one of: a run (``run_id`` + ``artifact_path``), a
    succeeded training job (``job_id``), or an artifact URI inside the artifact root
    (``source`` + ``format`` for a single file). Uploads use multipart/form-data instead."""

    run_id: str | None = Field(None, description="MLflow run that logged the model.")
    artifact_path: str = Field("model", description="Where in the run the MLflow model is (relative).")
    job_id: str | None = Field(None, description="A succeeded training job; its run's model is registered.")
    source: str | None = Field(
        None, description="A file or MLflow model directory inside settings.artifact_root (path or file:// URI; "
        "s3:// inside the root's bucket and prefix when the root is on S3).",
    )
    format: Literal["onnx", "skops", "sklearn-pickle", "torchscript"] | None = Field(
        None, description="Format of a single-file source."
    )
    description: str = Field("", description="Version description.")
    tags: dict[str, str] = Field(default_factory=dict, description="Free tags (not 'matih.' or 'mlflow.').")
    n_features: int | None = Field(None, ge=1, le=100_000, description="Input width, where the file does not say.")
    task: Literal["classification", "regression"] | None = Field(None, description="What the model predicts.")
    feature_names: list[str] | None = Field(None, description="Feature names in input order.")
    classes: list[Any] | None = Field(None, description="Class labels in output order (classifiers).")

    @model_validator(mode="after")
    def _one_source(self) -> VersionCreate:
        given = [k for k in ("run_id", "job_id", "source") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of run_id, job_id or source (or upload a file as multipart/form-data); "
                f"got {', '.join(given) or 'none'}"
            )
        return self


class _UploadFields(_Strict):
    format: Literal["onnx", "skops", "sklearn-pickle", "torchscript"]
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    n_features: int | None = Field(None, ge=1, le=100_000)
    task: Literal["classification", "regression"] | None = None
    feature_names: list[str] | None = None
    classes: list[Any] | None = None


class VersionUpdate(_Strict):
    description: str | None = Field(None, description="New description.")
    intended_use: str | None = Field(None, description="Intended use, shown in the model card (tag matih.intended_use).")
    tags: dict[str, str] | None = Field(None, description="Tags to set (not 'matih.' or 'mlflow.').")


class AliasSet(_Strict):
    version: str | int = Field(..., description="Version the alias points to.", examples=["3"])


class StageChange(_Strict):
    stage: Literal["staging", "production", "archived"]
    archive_existing: bool = Field(
        False, description="Archive the version that held this stage, instead of leaving it without a stage."
    )


class Approval(_Strict):
    comment: str = Field("", description="Why it is approved; kept on the version (tag matih.approval_comment).")


_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file", "format"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "The model file."},
        "format": {"type": "string", "enum": list(FORMATS)},
        "description": {"type": "string"},
        "n_features": {"type": "integer", "description": "Input width, where the file does not say (TorchScript)."},
        "task": {"type": "string", "enum": ["classification", "regression"]},
        "feature_names": {"type": "string", "description": "JSON list, or names separated by commas."},
        "classes": {"type": "string", "description": "JSON list of class labels in output order."},
        "tags": {"type": "string", "description": "JSON object of free tags."},
    },
}


def _parse(model: type[BaseModel], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors())) from None


def _form_list(value: str | None, field: str) -> list[Any] | None:
    if not value:
        return None
    text = value.strip()
    if text.startswith("["):
        try:
            out = json.loads(text)
        except ValueError:
            raise InvalidInput(f"{field} is not a JSON list: {text[:80]!r}", details={"field": field}) from None
        if not isinstance(out, list):
            raise InvalidInput(f"{field} must be a JSON list", details={"field": field})
        return out
    return [part.strip() for part in text.split(",") if part.strip()]


def _form_upload(form) -> tuple[bytes, str, dict[str, Any]]:
    """(file bytes, file name, VersionCreate-like fields) from a multipart form."""
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise InvalidInput("the form needs a 'file' part holding the model file", details={"field": "file"})
    fields: dict[str, Any] = {}
    for key in ("format", "description", "task"):
        if form.get(key):
            fields[key] = str(form.get(key))
    if form.get("n_features"):
        try:
            fields["n_features"] = int(str(form.get("n_features")))
        except ValueError:
            raise InvalidInput("n_features must be an integer", details={"field": "n_features"}) from None
    if "format" not in fields:
        raise InvalidInput(f"the form needs 'format', one of {', '.join(FORMATS)}", details={"field": "format"})
    fields["feature_names"] = _form_list(form.get("feature_names"), "feature_names")
    fields["classes"] = _form_list(form.get("classes"), "classes")
    if form.get("tags"):
        try:
            fields["tags"] = json.loads(str(form.get("tags")))
        except ValueError:
            raise InvalidInput("tags must be a JSON object", details={"field": "tags"}) from None
    unknown = sorted(set(form.keys()) - set(_UPLOAD_SCHEMA["properties"]))
    if unknown:
        raise InvalidInput(f"unknown form fields: {', '.join(unknown)}", details={"field": unknown[0]})
    return upload, getattr(upload, "filename", "") or "", fields


def router(ctx) -> APIRouter:
    from app.api.app import role_dependencies

    viewer, _predictor, developer, admin = role_dependencies(ctx)
    svc = RegistryService(ctx.settings, ctx.registry, ctx.store)
    api = APIRouter(tags=["registry"])

    def run(fn, *args, **kwargs):
        return asyncio.to_thread(fn, *args, **kwargs)

    async def convert_run(method: str, *args, **kwargs):
        """A RegistryService call that reads and converts a model file: where the context
        runs such work (a Ray task in the Gateway), else in a thread here."""
        if ctx.registry_offload is None:
            return await run(getattr(svc, method), *args, **kwargs)
        return await ctx.registry_offload(method, *args, **kwargs)

    # -- registered models -----------------------------------------------------------------
    @api.post("/v1/models", status_code=201, summary="Create a registered model")
    async def create_model(body: ModelCreate, who: Principal = developer) -> dict[str, Any]:
        return await run(svc.create_model, body.name, who.name, body.description, body.tags)

    @api.get("/v1/models", response_model=Page, summary="List registered models")
    async def list_models(
        limit: int = Query(50, ge=1, le=500), page_token: str | None = None, _: Principal = viewer
    ) -> dict[str, Any]:
        items, nxt = await run(svc.list_models, limit, page_token)
        return {"items": items, "next_page_token": nxt}

    @api.get("/v1/models/{name}", summary="A registered model: description, tags, aliases")
    async def get_model(name: str, _: Principal = viewer) -> dict[str, Any]:
        return await run(svc.get_model, name)

    @api.patch("/v1/models/{name}", summary="Change a model's description or tags")
    async def update_model(name: str, body: ModelUpdate, who: Principal = developer) -> dict[str, Any]:
        return await run(svc.update_model, name, who.name, body.description, body.tags)

    @api.delete("/v1/models/{name}", status_code=204, summary="Delete a model and its versions (409 while served)")
    async def delete_model(name: str, who: Principal = developer) -> Response:
        used = await run(endpoints_using, ctx.store, name)
        await run(svc.delete_model, name, who.name, used)
        await ctx.notify_model_changed(name)
        return Response(status_code=204)

    # -- versions --------------------------------------------------------------------------
    @api.post(
        "/v1/models/{name}/versions",
        status_code=201,
        summary="Register a version from a run, a training job, an artifact URI, or an upload",
        description="JSON (`VersionCreate`): `{run_id, artifact_path}`, `{job_id}` or `{source, format}` "
        "(inside the artifact root). multipart/form-data: `file` and `format` (onnx, skops, sklearn-pickle, "
        "torchscript). skops and TorchScript are converted to ONNX with a parity check; pickle-based files "
        "are stored without being loaded and start untrusted. The model is created if it does not exist.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": VersionCreate.model_json_schema()},
                    "multipart/form-data": {"schema": _UPLOAD_SCHEMA},
                },
            }
        },
    )
    async def create_version(name: str, request: Request, who: Principal = developer) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=len(_UPLOAD_SCHEMA["properties"])) as form:
                upload, filename, fields = _form_upload(form)
                body = _parse(_UploadFields, {k: v for k, v in fields.items() if v is not None})
                data = await upload.read()
            hints = Hints(body.n_features, body.task, body.feature_names, body.classes)
            view = await convert_run(
                "register_upload", name, body.format, data, who.name, filename=filename,
                description=body.description, tags=body.tags, hints=hints,
            )
        else:
            try:
                raw = await request.json()
            except ValueError:
                raise BadRequest(
                    "the request body is not valid JSON; send a JSON VersionCreate, or multipart/form-data with "
                    "'file' and 'format' to upload",
                    details={"field": "body"},
                ) from None
            if not isinstance(raw, dict):
                raise BadRequest("the request body must be a JSON object", details={"field": "body"})
            body = _parse(VersionCreate, raw)
            hints = Hints(body.n_features, body.task, body.feature_names, body.classes)
            common = {"description": body.description, "tags": body.tags}
            if body.run_id:
                view = await run(svc.register_from_run, name, body.run_id, who.name, artifact_path=body.artifact_path,
                                 **common)
            elif body.job_id:
                view = await run(svc.register_from_job, name, body.job_id, who.name, artifact_path=body.artifact_path,
                                 **common)
            else:
                view = await convert_run("register_from_source", name, body.source, who.name, fmt=body.format, hints=hints,
                                 **common)
        await ctx.notify_model_changed(name)
        return view

    @api.get("/v1/models/{name}/versions", response_model=Page, summary="List a model's versions, newest first")
    async def list_versions(
        name: str, limit: int = Query(50, ge=1, le=500), page_token: str | None = None, _: Principal = viewer
    ) -> dict[str, Any]:
        items, nxt = await run(svc.list_versions, name, limit, page_token)
        return {"items": items, "next_page_token": nxt}

    @api.get(
        "/v1/models/{name}/versions/{version}",
        summary="A version: metrics, params, signature, lineage, formats, stage, trust, aliases",
    )
    async def get_version(name: str, version: str, _: Principal = viewer) -> dict[str, Any]:
        return await run(svc.get_version, name, version)

    @api.patch("/v1/models/{name}/versions/{version}", summary="Set a version's description, intended use or tags")
    async def update_version(name: str, version: str, body: VersionUpdate, who: Principal = developer) -> dict[str, Any]:
        view = await run(svc.update_version, name, version, who.name, body.description, body.intended_use, body.tags)
        await ctx.notify_model_changed(name)
        return view

    @api.put("/v1/models/{name}/aliases/{alias}", summary="Point an alias at a version")
    async def set_alias(name: str, alias: str, body: AliasSet, who: Principal = developer) -> dict[str, Any]:
        out = await run(svc.set_alias, name, alias, body.version, who.name)
        await ctx.notify_model_changed(name)
        return out

    @api.delete("/v1/models/{name}/aliases/{alias}", status_code=204, summary="Remove an alias")
    async def delete_alias(name: str, alias: str, who: Principal = developer) -> Response:
        await run(svc.delete_alias, name, alias, who.name)
        await ctx.notify_model_changed(name)
        return Response(status_code=204)

    @api.post(
        "/v1/models/{name}/versions/{version}/stage",
        summary="Move a version to staging, production or archived (409 naming a missing step)",
    )
    async def set_stage(name: str, version: str, body: StageChange, who: Principal = developer) -> dict[str, Any]:
        view = await run(svc.set_stage, name, version, body.stage, who.name, body.archive_existing)
        await ctx.notify_model_changed(name)
        return view

    @api.post("/v1/models/{name}/versions/{version}/approve", summary="Approve a version for production (admin)")
    async def approve(name: str, version: str, body: Approval | None = None, who: Principal = admin) -> dict[str, Any]:
        view = await run(svc.approve, name, version, who.name, body.comment if body else "")
        await ctx.notify_model_changed(name)
        return view

    @api.post(
        "/v1/models/{name}/versions/{version}/trust",
        summary="Mark a pickle-based version trusted, so it may be unpickled (admin)",
    )
    async def trust(name: str, version: str, who: Principal = admin) -> dict[str, Any]:
        view = await run(svc.trust, name, version, who.name)
        await ctx.notify_model_changed(name)
        return view

    @api.post(
        "/v1/models/{name}/versions/{version}/convert",
        status_code=201,
        summary="Make a new ONNX version from a skops, TorchScript or trusted pickle version",
    )
    async def convert(name: str, version: str, who: Principal = developer) -> dict[str, Any]:
        view = await convert_run("convert", name, version, who.name)
        await ctx.notify_model_changed(name)
        return view

    @api.get(
        "/v1/models/{name}/versions/{version}/card",
        summary="Model card (JSON, or Markdown with ?format=markdown)",
    )
    async def card(
        name: str, version: str, format: Literal["json", "markdown"] = "json", _: Principal = viewer
    ) -> Any:
        out = await run(svc.card, name, version)
        if format == "markdown":
            return Response(card_markdown(out), media_type="text/markdown")
        return out

    @api.get("/v1/models/{name}/compare", summary="Side-by-side metrics and params of versions")
    async def compare(
        name: str,
        versions: str = Query(..., description="Comma-separated versions, 2 to 10.", examples=["1,2"]),
        _: Principal = viewer,
    ) -> dict[str, Any]:
        return await run(svc.compare, name, [v.strip() for v in versions.split(",") if v.strip()])

    # -- tracking --------------------------------------------------------------------------
    @api.get("/v1/experiments", response_model=Page, tags=["tracking"], summary="List MLflow experiments")
    async def list_experiments(
        limit: int = Query(50, ge=1, le=500), page_token: str | None = None, _: Principal = viewer
    ) -> dict[str, Any]:
        items, nxt = await run(svc.list_experiments, limit, page_token)
        return {"items": items, "next_page_token": nxt}

    @api.get("/v1/experiments/{experiment_id}/runs", response_model=Page, tags=["tracking"],
             summary="Runs of an experiment, newest first")
    async def list_runs(
        experiment_id: str, limit: int = Query(50, ge=1, le=500), page_token: str | None = None,
        _: Principal = viewer,
    ) -> dict[str, Any]:
        items, nxt = await run(svc.list_runs, experiment_id, limit, page_token)
        return {"items": items, "next_page_token": nxt}

    @api.get("/v1/runs/{run_id}", tags=["tracking"], summary="A run: status, metrics, params, tags")
    async def get_run(run_id: str, _: Principal = viewer) -> dict[str, Any]:
        return await run(svc.get_run, run_id)

    return api

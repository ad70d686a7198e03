"""The registry side of ensembles: members pinned and checked, and the one way an ensemble
version is made (:func:`publish`), used by ``POST /v1/ensembles`` (voting, averaging) and by
the ``kind: ensemble`` job (stacking, blending, bagging, boosting).

An ensemble version is an ordinary MLflow model version, so aliases, stages, approvals,
endpoints and rollouts treat it like any model. What makes it an ensemble is in its tags
(``matih.kind=ensemble``, the pinned definition in ``matih.ensemble``) and its artifacts
(``ensemble.json``, ``combiner.onnx``, and ``model.onnx`` when a fused graph exists); see
:mod:`app.ensembles.definition`.

Members are pinned and checked in :mod:`app.ensembles.pinning` (re-exported here:
``pin_definition``, ``pin_members``, ``definition_for``, ``definition_tag``); holdout scoring,
the champion's score and the fused graph are in :mod:`app.ensembles.scoring`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from app.ensembles.definition import (
    COMBINER_FILE,
    DEFINITION_FILE,
    DEFINITION_TAG,
    ENSEMBLE_FORMAT,
    KIND_TAG,
    Combine,
    EnsembleDefinition,
    PinnedMember,
)
from app.ensembles.pinning import (  # noqa: F401  (re-exported: the ensemble job and the API import them from here)
    ENSEMBLE_KIND,
    MAX_TAG_CHARS,
    check_members,
    client_of,
    definition_for,
    definition_tag,
    pin_definition,
    pin_members,
)
from app.ensembles.scoring import (
    MAIN_METRIC,
    beats_best_member,
    champion_report,
    fused_graph,
    holdout_labels,
    load_member_models,
)
from app.errors import Conflict, InvalidInput, MatihError
from app.registry.cards import TAG_ENSEMBLE_REPORT as TAG_REPORT
from app.registry.lineage import code_version
from app.registry.mlflow_registry import (
    TAG_CLASSES,
    TAG_CODE_VERSION,
    TAG_DATASET_SHA256,
    TAG_DATASET_URI,
    TAG_FEATURES,
    TAG_FORMAT,
    TAG_FORMATS,
    TAG_JOB,
    TAG_PARITY,
    TAG_STAGE,
    TAG_TASK,
    TAG_VALIDATION,
    TAG_VALIDATION_REPORT,
    ensure_experiment,
)
from app.registry.outbox import OP_CREATE, TAG_OP, new_nonce

log = logging.getLogger(__name__)

TAG_COMBINER_SHA256 = "matih.combiner_sha256"  # of combiner.onnx: a retrained meta-learner is a new version
TAG_MEMBER_INDEX = "matih.member_index"  # on a "<ensemble>-members" version: which member of its job it is
TAG_MEMBERS_OF = "matih.members_of"  # on the "<ensemble>-members" registered model
REPORT_FILE = "ensemble_report.json"
MEMBERS_SUFFIX = "-members"


def _signature(defn: EnsembleDefinition):
    if not defn.n_features:
        return None
    import pandas as pd
    from mlflow.models import infer_signature

    sample = np.zeros((2, defn.n_features), dtype=np.float32)
    names = defn.feature_names if defn.feature_names and len(defn.feature_names) == defn.n_features else None
    return infer_signature(pd.DataFrame(sample, columns=names) if names else sample)


def _write_model_dir(dest: Path, defn: EnsembleDefinition, fused, combiner: bytes | None,
                     report: dict[str, Any]) -> None:
    """The version's MLflow model directory: the ONNX flavor (model.onnx) when fused, else an
    MLmodel without flavors; ensemble.json, combiner.onnx, ensemble_report.json beside."""
    from mlflow.models import Model

    sig = _signature(defn)
    if fused is not None:
        import mlflow.onnx

        mlflow.onnx.save_model(fused, str(dest), signature=sig, pip_requirements=["onnxruntime"],
                               save_as_external_data=False)
    else:
        dest.mkdir(parents=True)
        Model(signature=sig).save(str(dest / "MLmodel"))
    (dest / DEFINITION_FILE).write_text(json.dumps(defn.to_dict(), indent=2, sort_keys=True, default=str))
    if combiner is not None:
        (dest / COMBINER_FILE).write_bytes(combiner)
    (dest / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))


# -- publishing -----------------------------------------------------------------------------------
def _versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"]))
    except MlflowException:
        return []


def _report_of(tags: dict[str, str]) -> dict[str, Any]:
    try:
        return json.loads(tags.get(TAG_REPORT) or "{}")
    except ValueError:
        return {}


def version_result(client, name: str, mv, aliases: list[str] | None = None, created: bool = False) -> dict[str, Any]:
    """What :func:`publish` returns, for a version that exists (made now or earlier)."""
    tags = dict(mv.tags or {})
    report = _report_of(tags)
    if aliases is None:
        aliases = sorted(a for a, v in (client.get_registered_model(name).aliases or {}).items()
                         if str(v) == str(mv.version))
    validation = json.loads(tags[TAG_VALIDATION_REPORT]) if TAG_VALIDATION_REPORT in tags else None
    return {
        "model_name": name, "model_version": str(mv.version), "aliases": aliases, "run_id": mv.run_id,
        "metrics": report.get("metrics"), "member_metrics": report.get("member_metrics"),
        "beats_best_member": report.get("beats_best_member"), "fused": bool(report.get("fused")),
        "validation": validation, "created": created,
        "definition": json.loads(tags[DEFINITION_TAG]) if DEFINITION_TAG in tags else None,
    }


def _ensure_ensemble_model(client, name: str) -> None:
    """The registered model, tagged ``matih.kind=ensemble`` (what GET /v1/ensembles lists); a
    plain model of that name with versions is not turned into an ensemble (409)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, tags={KIND_TAG: ENSEMBLE_KIND})
            return
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            rm = client.get_registered_model(name)
    if (rm.tags or {}).get(KIND_TAG) != ENSEMBLE_KIND:
        if _versions(client, name):
            raise Conflict(f"model {name!r} exists and is not an ensemble; give the ensemble another name",
                           details={"field": "name"})
        client.set_registered_model_tag(name, KIND_TAG, ENSEMBLE_KIND)


def _compact(values: dict[str, float] | None) -> dict[str, float] | None:
    return None if values is None else {k: float(f"{v:.6g}") for k, v in values.items()}


def publish(
    client,
    settings,
    defn: EnsembleDefinition,
    *,
    member_models: list[bytes] | None = None,
    combiner: bytes | None = None,
    data=None,
    validation=None,
    fuse: bool = True,
    job_id: str | None = None,
    actor: str = "system",
    extra_result: dict[str, Any] | None = None,
    store=None,
) -> dict[str, Any]:
    """Make (or find) the ensemble version of ``defn``; returns ``{model_name, model_version,
    aliases, metrics, member_metrics, beats_best_member, fused, validation, run_id, created,
    definition}`` plus ``extra_result``.

    ``client``: an MlflowClient (or a ModelRegistry). ``member_models``: each member's ONNX
    bytes in member order (None: downloaded when needed). ``combiner``: the meta-learner as
    ONNX (stacking, blending). ``data``: an :class:`app.training.data.PreparedData` whose
    holdout scores the ensemble, each member and the champion (the gates of ``validation``, an
    :class:`app.training.spec.ValidationSpec`, need it). ``fuse``: also store a fused graph
    when :func:`app.ensembles.fused.fusable`. ``job_id``: the job making it (repeatable: a
    version tagged with the job id is returned, its alias ensured). ``store``: the metadata
    store, for the registry outbox and the audit record (API path).

    Steps: a job's earlier version is returned; the same definition (and combiner) as the
    latest version returns that version, nothing new; scoring and gates (failing gates raise
    :class:`app.training.pipeline.ValidationFailed`, nothing registered); fusing with a parity
    check; one MLflow run with the artifacts; ONE ``create_model_version`` with every tag; the
    alias (``champion`` for the first version, else ``validation.alias_on_pass``).
    """
    from app.training.pipeline import ValidationFailed, job_version, ensure_alias, register_version
    from app.training.spec import ValidationSpec

    client = client_of(client)
    validation = validation or ValidationSpec()
    if combiner is not None and not defn.has_combiner:
        defn = dataclasses.replace(defn, has_combiner=True)
    if defn.has_combiner and combiner is None:
        raise InvalidInput("the definition has a combiner and none was given", details={"field": "combiner"})
    tag = definition_tag(defn)
    if validation.gates and data is None:
        raise InvalidInput("validation.gates need a dataset to score the ensemble on; give dataset or drop the gates",
                           details={"field": "dataset"})
    name = defn.name
    combiner_sha = hashlib.sha256(combiner).hexdigest() if combiner is not None else ""
    _ensure_ensemble_model(client, name)
    if job_id:
        prior = job_version(client, name, job_id)
        if prior is not None:  # a retry after the version was registered
            ensure_alias(client, name, str(prior.version), validation.alias_on_pass)
            return {**version_result(client, name, prior), **(extra_result or {})}
    versions = _versions(client, name)
    if versions:
        latest = versions[0]
        lt = dict(latest.tags or {})
        if lt.get(DEFINITION_TAG) == tag and lt.get(TAG_COMBINER_SHA256, "") == combiner_sha \
                and lt.get(TAG_STAGE) != "archived":
            return {**version_result(client, name, latest), **(extra_result or {})}

    result: dict[str, Any] = {"model_name": name, "metrics": None, "member_metrics": None,
                              "beats_best_member": None, "fused": False, "validation": None}
    local = None
    if data is not None or fuse:
        if member_models is None and (data is not None or _maybe_fusable(defn)):
            member_models = load_member_models(client, settings, defn)
        if member_models is not None and len(member_models) != len(defn.members):
            raise InvalidInput(f"{len(member_models)} member models for {len(defn.members)} members",
                               details={"field": "member_models"})
    report = None
    if data is not None:
        from app.ensembles.local import LocalEnsemble
        from app.training.validation import check_gates

        y_true = holdout_labels(data, data.y_holdout)
        local = LocalEnsemble(defn, member_models, combiner)
        metrics, member_metrics = local.score(data.X_holdout, y_true)
        result.update(metrics=metrics, member_metrics=list(member_metrics),
                      beats_best_member=beats_best_member(defn.task, metrics, member_metrics))
        champion = champion_report(client, settings, defn, validation.compare_with, data, y_true)
        report = check_gates(validation, metrics, champion)
        result["validation"] = report.as_dict()
        if not report.passed:
            raise ValidationFailed(
                "validation gates failed: " + "; ".join(report.failures()) + "; nothing was registered",
                result={**result, **(extra_result or {})},
            )
    fused_proto, parity, why = None, None, None
    if fuse and member_models is not None and _maybe_fusable(defn):
        if local is None:
            from app.ensembles.local import LocalEnsemble

            local = LocalEnsemble(defn, member_models, combiner)
        try:
            fused_proto, parity, why = fused_graph(defn, member_models, combiner, local, data, settings)
        except Exception as exc:  # the fused graph only saves calls: the fan-out version is still made
            log.warning("ensemble %s: no fused graph: %s", name, exc, exc_info=True)
            fused_proto, parity, why = None, None, f"the fused graph could not be built: {type(exc).__name__}: {exc}"
    result["fused"] = fused_proto is not None
    if why and fuse:
        result["fused_note"] = why

    summary = {"metrics": _compact(result["metrics"]),
               "member_metrics": [_compact(mm) for mm in result["member_metrics"]] if result["member_metrics"] else None,
               "beats_best_member": result["beats_best_member"], "fused": result["fused"],
               "main_metric": MAIN_METRIC[defn.task][0]}
    tags = _version_tags(client, defn, tag, summary, report, data, job_id, actor, parity if result["fused"] else None,
                         combiner_sha)
    run_id, source = _log_run(client, settings, defn, fused_proto, combiner, {**result, **(extra_result or {})},
                              job_id)
    result["run_id"] = run_id
    if job_id:
        version, alias = register_version(client, name, job_id, source=source, run_id=run_id, model_id=None,
                                          tags=tags, alias_on_pass=validation.alias_on_pass)
    else:
        version = _create_version(client, store, name, source, run_id, tags, actor)
        alias = ensure_alias(client, name, version, validation.alias_on_pass)
    result.update(model_version=version, aliases=[alias], created=True, definition=defn.to_dict())
    return {**result, **(extra_result or {})}


def _maybe_fusable(defn: EnsembleDefinition) -> bool:
    """Whether fusing is worth loading members for: every member served by ONNX."""
    return all(m.runtime == "onnx" for m in defn.members)


def _version_tags(client, defn, tag, summary, report, data, job_id, actor, parity, combiner_sha) -> dict[str, str]:
    from app.registry.base import TAG_REGISTERED_BY, TAG_SOURCE_KIND

    member_tags = [dict(client.get_model_version(m.name, m.version).tags or {}) for m in defn.members]
    members_valid = all(t.get(TAG_VALIDATION) == "passed" for t in member_tags)
    tags = {
        KIND_TAG: ENSEMBLE_KIND,
        DEFINITION_TAG: tag,
        TAG_FORMAT: "onnx" if summary["fused"] else ENSEMBLE_FORMAT,
        TAG_FORMATS: json.dumps(["onnx", ENSEMBLE_FORMAT] if summary["fused"] else [ENSEMBLE_FORMAT]),
        TAG_TASK: defn.task,
        TAG_REPORT: json.dumps(summary, separators=(",", ":"))[:MAX_TAG_CHARS],
        TAG_CODE_VERSION: code_version(),
        TAG_REGISTERED_BY: actor,
        TAG_SOURCE_KIND: "job" if job_id else ENSEMBLE_KIND,
    }
    # passed: every member passed its own validation, the gates passed (when scored) and the
    # fused graph (when stored) matches the fan-out; production requires it
    if members_valid and (report is None or report.passed):
        tags[TAG_VALIDATION] = "passed"
    if report is not None:
        tags[TAG_VALIDATION_REPORT] = json.dumps(report.as_dict(), separators=(",", ":"), default=str)[:4900]
    if defn.classes is not None:
        tags[TAG_CLASSES] = json.dumps(defn.classes)
    if defn.feature_names is not None:
        tags[TAG_FEATURES] = json.dumps(defn.feature_names)
    if job_id:
        tags[TAG_JOB] = job_id
    if parity is not None:
        tags[TAG_PARITY] = repr(parity)
    if combiner_sha:
        tags[TAG_COMBINER_SHA256] = combiner_sha
    if data is not None and getattr(data, "dataset_uri", ""):
        tags[TAG_DATASET_URI] = data.dataset_uri
        tags[TAG_DATASET_SHA256] = data.dataset_sha256
    return tags


def _log_run(client, settings, defn, fused_proto, combiner, result, job_id) -> tuple[str, str]:
    """A run of the platform experiment holding the version's artifacts under ``model``:
    (run id, source of the version)."""
    from app.errors import DependencyUnavailable
    from app.registry.base import TAG_SOURCE_KIND

    exp_id = ensure_experiment(client, settings)
    run_tags = {TAG_SOURCE_KIND: "job" if job_id else ENSEMBLE_KIND, KIND_TAG: ENSEMBLE_KIND}
    if job_id:
        run_tags[TAG_JOB] = job_id
    run = client.create_run(exp_id, run_name=f"ensemble-{defn.name}", tags=run_tags)
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="matih-ensemble-") as tmp:
            _write_model_dir(Path(tmp) / "model", defn, fused_proto, combiner, result)
            client.log_artifacts(run_id, str(Path(tmp) / "model"), artifact_path="model")
        params = {"method": defn.method, "combine": defn.combine.kind, "members": len(defn.members),
                  **{f"member_{i}": m.target for i, m in enumerate(defn.members)}}
        for k, v in params.items():
            client.log_param(run_id, k, str(v)[:500])
        for k, v in (result.get("metrics") or {}).items():
            client.log_metric(run_id, k, v)
            client.log_metric(run_id, f"holdout_{k}", v)
        for i, mm in enumerate(result.get("member_metrics") or []):
            for k, v in (mm or {}).items():
                client.log_metric(run_id, f"member_{i}_{k}", v)
        client.set_terminated(run_id, "FINISHED")
    except MatihError:
        client.set_terminated(run_id, "FAILED")
        raise
    except Exception as exc:
        client.set_terminated(run_id, "FAILED")
        raise DependencyUnavailable(f"could not store the ensemble's artifacts in MLflow: {exc}") from None
    return run_id, run.info.artifact_uri.rstrip("/") + "/model"


def _create_version(client, store, name: str, source: str, run_id: str, tags: dict[str, str], actor: str) -> str:
    """ONE ``create_model_version`` with every tag, through the registry outbox when there is a
    store (``app/registry/outbox.py``: the intent first, the nonce tag with the others, the
    completion with its audit record), so a crash in between is settled by recovery."""
    from mlflow.exceptions import MlflowException

    from app.errors import DependencyUnavailable
    from app.registry.mlflow_registry import mlflow_error

    op_id = None
    if store is not None:
        nonce = new_nonce()
        op_id = store.begin_op(OP_CREATE, name, actor, {"kind": ENSEMBLE_KIND, "source": source[:500], "nonce": nonce})
        tags = {**tags, TAG_OP: nonce}
    sent = False
    try:
        sent = True
        try:
            mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        except MlflowException as exc:
            raise mlflow_error(exc, f"a version of {name!r}") from None
        except (ConnectionError, TimeoutError) as exc:
            raise DependencyUnavailable(f"MLflow is unavailable: {exc}") from None
    except BaseException as exc:
        if op_id is not None and not (sent and isinstance(exc, DependencyUnavailable)):
            store.finish_op(op_id, "rolled_back", error=getattr(exc, "message", None) or type(exc).__name__)
        raise  # else left pending: recovery looks for the version by the nonce
    if op_id is not None:
        view = {"name": name, "version": str(mv.version), "source": source, "tags": dict(tags)}
        store.finish_op(op_id, "done", version=str(mv.version),
                        audit=("model_version.create", "model_version", f"{name}/{mv.version}", None, view))
    return str(mv.version)


# -- members trained by a job (bagging, boosting) -------------------------------------------------
def members_model_name(ensemble_name: str) -> str:
    from app.names import check_name

    return check_name(ensemble_name + MEMBERS_SUFFIX, "name")


def register_members(client, settings, ensemble_name: str, models: list[bytes], *, task: str,
                     classes: list | None, feature_names: list[str] | None, job_id: str, data=None,
                     weights: list[float] | None = None) -> list[PinnedMember]:
    """Register each trained member (ONNX bytes) as a version of ``<ensemble>-members`` (no
    alias) tagged like a training job's version plus its index; a retry of the job finds the
    members an earlier attempt registered (by job id and index) instead of registering them
    again. Returns them pinned, in order, with ``weights`` (default 1)."""
    import onnx
    from mlflow.exceptions import MlflowException

    client = client_of(client)
    name = members_model_name(ensemble_name)
    try:
        client.create_registered_model(name, tags={TAG_MEMBERS_OF: ensemble_name})
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found: dict[int, str] = {}
    for mv in _versions(client, name):
        t = mv.tags or {}
        if t.get(TAG_JOB) == job_id and t.get(TAG_MEMBER_INDEX, "").isdigit():
            found.setdefault(int(t[TAG_MEMBER_INDEX]), str(mv.version))
    missing = [i for i in range(len(models)) if i not in found]
    if missing:
        exp_id = ensure_experiment(client, settings)
        run = client.create_run(exp_id, run_name=f"{name}-{job_id}", tags={TAG_JOB: job_id})
        run_id = run.info.run_id
        n = len(feature_names) if feature_names else onnx_width(models[0])
        defn_like = EnsembleDefinition(name=name, task=task, method="bagging", members=(), combine=combine_kind(task),
                                       feature_names=feature_names, n_features=n)
        with tempfile.TemporaryDirectory(prefix="matih-members-") as tmp:
            import mlflow.onnx

            for i in missing:
                mlflow.onnx.save_model(onnx.load_from_string(models[i]), str(Path(tmp) / f"member-{i}"),
                                       signature=_signature(defn_like), pip_requirements=["onnxruntime"],
                                       save_as_external_data=False)
                client.log_artifacts(run_id, str(Path(tmp) / f"member-{i}"), artifact_path=f"member-{i}")
        client.set_terminated(run_id, "FINISHED")
        for i in missing:
            tags = {TAG_JOB: job_id, TAG_MEMBER_INDEX: str(i), TAG_FORMAT: "onnx", TAG_FORMATS: json.dumps(["onnx"]),
                    TAG_TASK: task, TAG_VALIDATION: "passed", TAG_CODE_VERSION: code_version(), TAG_MEMBERS_OF:
                    ensemble_name}
            if classes is not None:
                tags[TAG_CLASSES] = json.dumps(classes)
            if feature_names is not None:
                tags[TAG_FEATURES] = json.dumps(feature_names)
            if data is not None and getattr(data, "dataset_uri", ""):
                tags[TAG_DATASET_URI], tags[TAG_DATASET_SHA256] = data.dataset_uri, data.dataset_sha256
            mv = client.create_model_version(name, source=run.info.artifact_uri.rstrip("/") + f"/member-{i}",
                                             run_id=run_id, tags=tags)
            found[i] = str(mv.version)
    weights = weights or [1.0] * len(models)
    return [PinnedMember(name=name, version=found[i], weight=float(weights[i]), ref=f"{name}/{found[i]}")
            for i in range(len(models))]


def combine_kind(task: str) -> Combine:
    return Combine("soft_vote" if task == "classification" else "mean")


def onnx_width(model: bytes) -> int | None:
    """The input width of an ONNX graph (its first input's last dimension), None when dynamic."""
    import onnx

    dims = onnx.load_from_string(model).graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if dims and dims[-1].dim_value > 0 else None

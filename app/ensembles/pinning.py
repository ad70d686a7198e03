"""Members of an ensemble resolved through the registry, pinned to versions and checked
against each other: they must share the task, the input signature and (classifiers) the class
list; a member that is an ensemble, archived, or not servable by its runtime is refused. Every
refusal is a 422 naming the member (``details: {"field": "members[i].model", "member": ref}``).
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from app.ensembles.definition import KIND_TAG, EnsembleDefinition, PinnedMember, Policy, combine_for
from app.errors import InvalidInput, NotFound
from app.registry.mlflow_registry import TAG_FEATURES, TAG_STAGE, model_metadata
from app.registry.targets import parse_target

ENSEMBLE_KIND = "ensemble"
#: MLflow's limit on a tag value on some stores; the definition tag must fit it whole.
MAX_TAG_CHARS = 5000
#: Formats each member runtime can serve (triton serves from its own repository: any).
_RUNTIME_FORMATS = {"onnx": {"onnx"}, "native": {"skops", "sklearn-pickle", "torchscript"}}


def client_of(client):
    """An MlflowClient from either one or a :class:`ModelRegistry` (whose client it is)."""
    return getattr(client, "client", client)


def member_error(i: int, ref: str, message: str) -> InvalidInput:
    return InvalidInput(f"members[{i}] ({ref}): {message}", details={"field": f"members[{i}].model", "member": ref})


# -- pinning and checks ---------------------------------------------------------------------------
def pin_definition(registry, settings, spec) -> EnsembleDefinition:
    """The definition of ``spec`` (an :class:`app.ensembles.spec.EnsembleSpec` with members:
    voting, averaging, stacking, blending) with every member resolved (uncached) and pinned to
    its version, after the checks of the module docstring. ``registry``: a
    :class:`app.registry.mlflow_registry.ModelRegistry` or an MlflowClient. Stacking and
    blending get their meta-learner later (``publish`` sets ``has_combiner``)."""
    from app.serving.endpoint_config import check_endpoint_config

    resolved = []
    for i, m in enumerate(spec.members):
        try:
            ref = parse_target(m.model)
        except InvalidInput as exc:
            raise member_error(i, m.model, exc.message) from None
        try:
            check_endpoint_config(m.runtime, m.config, settings)
        except InvalidInput as exc:
            raise InvalidInput(f"members[{i}] ({m.model}): {exc.message}",
                               details={"field": f"members[{i}].config", "member": m.model}) from None
        try:
            rm = _resolve(registry, ref)
        except NotFound:
            raise member_error(i, m.model, "no such model version in the registry") from None
        resolved.append(rm)
    weighted = spec.method != "averaging" or spec.task == "classification" or spec.averaging == "weighted"
    members = tuple(
        PinnedMember(name=rm.name, version=rm.version, weight=float(m.weight or 1.0) if weighted else 1.0,
                     runtime=m.runtime, config=m.config, ref=m.model)
        for m, rm in zip(spec.members, resolved)
    )
    facts = check_members(spec.task, members, [rm.tags for rm in resolved], registry)
    return EnsembleDefinition(
        name=spec.name, task=spec.task, method=spec.method, members=members, combine=combine_for(spec),
        policy=Policy(spec.policy.min_members, spec.policy.member_timeout_s), **facts,
    )


def pin_members(registry, settings, spec) -> list[PinnedMember]:
    """The members of :func:`pin_definition`, pinned and checked (what a stacking or blending
    job trains its meta-learner over)."""
    return list(pin_definition(registry, settings, spec).members)


def _resolve(registry, ref):
    """``ref`` through a ModelRegistry (uncached), or straight through an MlflowClient."""
    if hasattr(registry, "resolve"):
        return registry.resolve(ref, use_cache=False)
    from mlflow.exceptions import MlflowException

    from app.registry.mlflow_registry import ResolvedModel, mlflow_error

    try:
        mv = registry.get_model_version_by_alias(ref.name, ref.alias) if ref.alias else \
            registry.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        err = mlflow_error(exc, f"model {ref}")
        raise (NotFound(f"model {ref} is not in the registry") if isinstance(err, NotFound) or
               "alias" in str(exc).lower() else err) from None
    return ResolvedModel(mv.name, str(mv.version), dict(mv.tags or {}))


def check_members(task: str, members: tuple[PinnedMember, ...] | list[PinnedMember], tags: list[dict[str, str]],
                  registry=None) -> dict[str, Any]:
    """Check pinned members (with their versions' tags) against each other and ``task``;
    returns the shared facts ``{classes, feature_names, n_features}``. Widths come from the
    versions' signatures, read through ``registry`` only when feature names do not decide."""
    feature_names = classes = None
    n_features: int | None = None
    first_names = first_classes = None
    for i, (m, t) in enumerate(zip(members, tags)):
        ref = m.ref or m.target
        meta = model_metadata_of(m, t)
        if t.get(KIND_TAG) == ENSEMBLE_KIND:
            raise member_error(i, ref, "is itself an ensemble; ensembles of ensembles are not supported, name its "
                                "members instead")
        if t.get(TAG_STAGE) == "archived":
            raise member_error(i, ref, f"version {m.version} is archived; pin a version that is not")
        servable = _RUNTIME_FORMATS.get(m.runtime)
        if servable is not None and not servable & set(meta["formats"]):
            raise member_error(i, ref, f"runtime {m.runtime!r} cannot serve it (its artifacts: "
                                f"{', '.join(meta['formats'])}); choose another runtime or convert it")
        if meta["task"] is None:
            raise member_error(i, ref, "its task is unknown (no matih.task tag); register it with a task")
        if meta["task"] != task:
            raise member_error(i, ref, f"is a {meta['task']} model; this ensemble is {task}")
        names = meta["feature_names"]
        if names is not None:
            if first_names is None:
                first_names = (i, names)
            elif names != first_names[1]:
                raise member_error(i, ref, f"takes features {names}, members[{first_names[0]}] takes "
                                    f"{first_names[1]}; members must share the input signature")
        if task == "classification":
            cls = meta["classes"]
            if cls is None:
                raise member_error(i, ref, "its class list is unknown (no matih.classes tag); register it with "
                                    "classes")
            if first_classes is None:
                first_classes = (i, cls)
            elif [str(c) for c in cls] != [str(c) for c in first_classes[1]]:
                raise member_error(i, ref, f"predicts classes {cls}, members[{first_classes[0]}] predicts "
                                    f"{first_classes[1]}; members must share the class list in the same order")
    if first_names is not None:
        feature_names = first_names[1]
        n_features = len(feature_names)
    if first_classes is not None:
        classes = first_classes[1]
    if registry is not None:
        widths = [_width(registry, m) if (feature_names is None or feature_names_of(t) is None) else len(feature_names)
                  for m, t in zip(members, tags)]
        known = [(i, w) for i, w in enumerate(widths) if w is not None]
        for i, w in known[1:]:
            if w != known[0][1]:
                ref = members[i].ref or members[i].target
                raise member_error(i, ref, f"takes {w} inputs, members[{known[0][0]}] takes {known[0][1]}; members "
                                    "must share the input signature")
        if known and n_features is None:
            n_features = known[0][1]
    return {"classes": classes, "feature_names": feature_names, "n_features": n_features}


def model_metadata_of(member: PinnedMember, tags: dict[str, str]) -> dict[str, Any]:
    from app.registry.mlflow_registry import ResolvedModel

    return model_metadata(ResolvedModel(member.name, member.version, dict(tags)))


def feature_names_of(tags: dict[str, str]) -> list[str] | None:
    return json.loads(tags[TAG_FEATURES]) if TAG_FEATURES in tags else None


def _width(registry, m: PinnedMember) -> int | None:
    """The input width of a member from its MLflow signature (only the MLmodel file is read);
    None when it has none (a Triton member, an upload without one)."""
    import mlflow.artifacts
    from mlflow.models import Model

    client = client_of(registry)
    try:
        uri = client.get_model_version_download_uri(m.name, m.version).rstrip("/") + "/MLmodel"
        with tempfile.TemporaryDirectory(prefix="matih-mlmodel-") as tmp:
            sig = Model.load(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)).signature
    except Exception:
        return None
    if sig is None or sig.inputs is None:
        return None
    inputs = sig.inputs.inputs
    if sig.inputs.has_input_names() and not any(getattr(s, "shape", None) for s in inputs):
        return len(inputs)  # one column per feature
    shape = getattr(inputs[0], "shape", None) if len(inputs) == 1 else None
    return int(shape[-1]) if shape and shape[-1] and shape[-1] > 0 else None


def definition_for(spec, members: list[PinnedMember], *, classes: list | None, feature_names: list[str] | None,
                   n_features: int | None = None, combine=None, has_combiner: bool = False) -> EnsembleDefinition:
    """The definition of a trained ensemble (bagging, boosting: members from
    :func:`register_members`; stacking, blending: ``dataclasses.replace`` on :func:`pin_members`'
    works too) with the combine rule the job completed (boosting's bias, stacking's inputs)."""
    return EnsembleDefinition(
        name=spec.name, task=spec.task, method=spec.method, members=tuple(members),
        combine=combine if combine is not None else combine_for(spec),
        policy=Policy(spec.policy.min_members, spec.policy.member_timeout_s), classes=classes,
        feature_names=feature_names, n_features=n_features if n_features is not None else (
            len(feature_names) if feature_names else None),
        has_combiner=has_combiner,
    )


def definition_tag(defn: EnsembleDefinition) -> str:
    """The compact JSON serving reads from ``matih.ensemble``; 422 when it would not fit a tag."""
    text = defn.to_json()
    if len(text) > MAX_TAG_CHARS:
        raise InvalidInput(
            f"the ensemble's definition is {len(text)} characters of JSON, over MLflow's tag limit of "
            f"{MAX_TAG_CHARS}; use fewer members or shorter member configs",
            details={"field": "members"},
        )
    return text

"""Serving an ensemble version as a fan-out: every member is called in parallel, the answers
that came back in time are combined (:func:`app.ensembles.combine.combine`), and the quorum
policy decides whether fewer than all of them are enough.

Where the fan-out runs follows the rule of single models (docs/architecture.md, "The online
path"): in the Gateway replica that took the request when every member is ONNX on CPU (its
members then run inline in the Gateway, no handle hop at all), else in the ``Ensemble`` Serve
deployment (``deployments/ensemble.py``), which calls the ModelServer replicas with
multiplexed handle calls. ``config.placement`` of the endpoint chooses otherwise. The same
:class:`EnsembleRunner` does the work in both places; only its member caller differs.

An ensemble version with a fused graph (matih.formats holds ``onnx``) is also a plain ONNX
model: ``config.ensemble: fused`` serves it through the single-model path instead.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from cachetools import LRUCache

from app.ensembles.definition import COMBINER_FILE, DEFINITION_TAG, KIND_TAG, EnsembleDefinition, PinnedMember
from app.errors import (
    BadRequest,
    Conflict,
    DependencyUnavailable,
    InvalidInput,
    MatihError,
    ModelError,
    PayloadTooLarge,
)
from app.registry.mlflow_registry import ResolvedModel

#: ``config.ensemble`` of an endpoint: how an ensemble target is served.
FANOUT, FUSED = "fanout", "fused"
#: ``?explain=members`` (REST), ``"explain": "members"`` (REST body, V2 parameters).
EXPLAIN_MEMBERS = "members"
_CACHE_SIZE = 256  # ensemble versions whose definition (and meta-learner) a process keeps
# A member's errors that are the caller's: the payload is wrong for every member alike, so the
# request fails with that 4xx. A member's other 4xx (its version deleted or archived: NotFound,
# Conflict) is the ensemble being partly down, which the quorum policy decides on.
PAYLOAD_ERRORS: tuple[type[MatihError], ...] = (BadRequest, InvalidInput, PayloadTooLarge)

MemberCall = Callable[[PinnedMember, dict[str, Any]], Awaitable[dict[str, Any]]]
MetaRunner = Callable[[np.ndarray], dict[str, Any]]


def is_ensemble(model: ResolvedModel) -> bool:
    return model.tags.get(KIND_TAG) == "ensemble"


def has_fused_graph(model: ResolvedModel) -> bool:
    """Whether the version is also a plain ONNX model (the registry stored a fused graph)."""
    from app.registry.mlflow_registry import model_metadata

    meta = model_metadata(model)
    return "onnx" in meta["formats"] or meta["format"] == "onnx"


def ensemble_mode(config: dict[str, Any] | None) -> str:
    return (config or {}).get("ensemble") or FANOUT


def check_ensemble_target(model: ResolvedModel, config: dict[str, Any] | None) -> None:
    """What creating or changing an endpoint checks against its resolved target: ``fused``
    needs a fused graph (422 naming config.ensemble)."""
    if ensemble_mode(config) != FUSED:
        return
    if not is_ensemble(model):
        raise InvalidInput(
            f"config.ensemble 'fused' applies to ensemble targets; {model.model_id} is not an ensemble",
            details={"field": "config.ensemble"},
        )
    if not has_fused_graph(model):
        raise InvalidInput(
            f"config.ensemble 'fused': ensemble {model.model_id} has no fused ONNX graph (one is stored only when "
            "every member and the combiner are ONNX); use 'fanout' or omit config.ensemble",
            details={"field": "config.ensemble", "model": model.model_id},
        )


def check_fused_servable(model: ResolvedModel) -> None:
    """A plain ONNX load of an ensemble version that has no fused graph: a 409 saying what to do."""
    if is_ensemble(model) and not has_fused_graph(model):
        raise Conflict(
            f"ensemble {model.model_id} has no fused ONNX graph, so it cannot be served as a single model; serve it "
            "as a fan-out (config.ensemble 'fanout', the default)",
            details={"model": model.name, "version": model.version},
        )


def wants_explain(value: Any) -> bool:
    """``explain=members`` asked (None or "" = not asked); anything else is the caller's 422."""
    if value in (None, "", False):
        return False
    if value == EXPLAIN_MEMBERS:
        return True
    raise InvalidInput(f"explain is {value!r}; the one explanation is 'members'", details={"field": "explain"})


def definition_of(model: ResolvedModel) -> EnsembleDefinition:
    """The version's definition, from its ``matih.ensemble`` tag (no download)."""
    raw = model.tags.get(DEFINITION_TAG)
    if not raw:
        raise ModelError(f"ensemble {model.model_id} has no {DEFINITION_TAG} tag; register it again")
    try:
        return EnsembleDefinition.from_json(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"ensemble {model.model_id}: its {DEFINITION_TAG} tag is not a definition ({exc})") from None


def runs_in_gateway(defn: EnsembleDefinition, config: dict[str, Any] | None, inline_onnx: bool) -> bool:
    """Where the fan-out runs (module docstring): ``config.placement`` when set, else the Gateway
    when every member is ONNX on CPU and the Gateway runs ONNX itself."""
    placement = (config or {}).get("placement")
    if placement is not None:
        return placement == "gateway"
    return inline_onnx and all(
        m.runtime == "onnx" and (m.config or {}).get("device", "cpu") == "cpu" for m in defn.members
    )


def member_model(member: PinnedMember) -> ResolvedModel:
    """What a predictor needs to call a member: its multiplexed id is ``name/version``; the
    replica that loads it resolves the tags itself."""
    return ResolvedModel(member.name, member.version)


def predictor_caller(predictor: Any) -> MemberCall:
    """A member caller over a predictor (``predict(model, payload, runtime, config, *, batch)``):
    members are called with ``batch=False``, since the members of one request run in the same
    replica at once, and request batching would wait ``serving.batch_wait_s`` for requests of
    other models to join."""

    async def call(member: PinnedMember, payload: dict[str, Any]) -> dict[str, Any]:
        return await predictor.predict(member_model(member), payload, member.runtime, member.config, batch=False)

    return call


def member_label(member: PinnedMember) -> str:
    """How answers name a member: ``name/version``, with ``runtime:`` before it when not ONNX
    (as multiplexed model ids do), so two runtimes of one version stay apart."""
    return member.target if member.runtime == "onnx" else f"{member.runtime}:{member.target}"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, MatihError):
        return exc.message
    return str(exc) or type(exc).__name__


class EnsembleRunner:
    """Runs ensemble versions as fan-outs (module docstring).

    ``call(member, payload)``: one member's answer (``{"predictions", "probabilities"?}``);
    ``fetch(model) -> Path``: the version's artifact directory (for ``combiner.onnx``; the
    RegistryCache packs it) and ``release(path)`` once the meta-learner is read; ``timeout_s``:
    a member's time limit when the policy names none (serving.predict_timeout_s);
    ``on_loop(member)``: the member runs on this event loop (an ONNX model inline in the
    Gateway), so its call cannot overlap another's: such members are awaited one after the
    other while the calls of the others (ModelServer replicas, remote runtimes, threads) run
    concurrently as tasks. A task per inline member would only add scheduling to a call that
    holds the loop anyway (measured: benchmarks/ensembles.py)."""

    def __init__(
        self,
        call: MemberCall,
        *,
        timeout_s: float,
        fetch: Callable[[ResolvedModel], Path] | None = None,
        release: Callable[[Path], None] | None = None,
        on_loop: Callable[[PinnedMember], bool] = lambda member: False,
    ):
        self.call = call
        self.timeout_s = timeout_s
        self._on_loop = on_loop
        self._fetch = fetch
        self._release = release
        self._definitions: LRUCache = LRUCache(maxsize=_CACHE_SIZE)  # model id -> EnsembleDefinition
        self._metas: LRUCache = LRUCache(maxsize=_CACHE_SIZE)  # model id -> asyncio.Task[MetaRunner]

    def definition(self, model: ResolvedModel) -> EnsembleDefinition:
        """Parsed once per version (versions are immutable)."""
        defn = self._definitions.get(model.model_id)
        if defn is None:
            defn = self._definitions[model.model_id] = definition_of(model)
        return defn

    async def _meta(self, model: ResolvedModel) -> MetaRunner:
        """The meta-learner of ``model``, loaded once per version (concurrent first requests share
        one load; a failed load is tried again by the next request)."""
        task = self._metas.get(model.model_id)
        if task is None or (task.done() and task.exception() is not None):
            task = self._metas[model.model_id] = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._load_meta, model)
            )
        return await asyncio.shield(task)

    def _load_meta(self, model: ResolvedModel) -> MetaRunner:
        from app.ensembles.local import meta_runner

        if self._fetch is None:
            raise ModelError(
                f"ensemble {model.model_id} needs its meta-learner, and this process cannot fetch artifacts"
            )
        path = self._fetch(model)
        try:
            found = path / COMBINER_FILE
            if not found.exists():
                found = next(iter(sorted(path.rglob(COMBINER_FILE))), None)
            if found is None:
                raise ModelError(
                    f"ensemble {model.model_id} has no {COMBINER_FILE} among its artifacts; register it again"
                )
            data = found.read_bytes()
        finally:
            if self._release is not None:
                self._release(path)
        return meta_runner(data)

    async def run(self, model: ResolvedModel, payload: dict[str, Any], explain: bool = False) -> dict[str, Any]:
        """The combined answer of ensemble version ``model`` for ``payload``: ``predictions``
        (and ``probabilities`` when asked), ``degraded: True`` plus ``failed`` when only a quorum
        answered, ``members`` when ``explain``. Fewer answers than the quorum: DependencyUnavailable
        (503, Retry-After) naming each member that failed and why. A member's payload error
        (:data:`PAYLOAD_ERRORS`) is the whole request's."""
        from app.ensembles.combine import combine

        defn = self.definition(model)
        meta = await self._meta(model) if defn.has_combiner else None
        asked_probabilities = bool(payload.get("return_probabilities"))
        member_payload = dict(payload)
        member_payload["return_probabilities"] = asked_probabilities or defn.needs_probabilities
        limit = defn.policy.member_timeout_s or self.timeout_s

        async def one(member: PinnedMember) -> tuple[dict[str, Any] | None, str | None, float]:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(limit):
                    out = await self.call(member, member_payload)
            except PAYLOAD_ERRORS:
                raise
            except TimeoutError:
                return None, f"no answer within {limit:g} s", time.perf_counter() - started
            except Exception as exc:  # noqa: BLE001 - a member that is down counts against the quorum
                return None, _error_text(exc), time.perf_counter() - started
            return out, None, time.perf_counter() - started

        # the members that wait on something else start first, as tasks; those that run on this
        # loop are then awaited in turn (each holds the loop while it computes)
        tasks = {i: asyncio.ensure_future(one(m)) for i, m in enumerate(defn.members) if not self._on_loop(m)}
        results: list[tuple[dict[str, Any] | None, str | None, float]] = []
        try:
            for i, m in enumerate(defn.members):
                results.append(await tasks[i] if i in tasks else await one(m))
        except BaseException:
            for t in tasks.values():
                t.cancel()
            raise
        outputs = [out for out, _, _ in results]
        failed = [(m, err) for m, (_, err, _) in zip(defn.members, results) if err is not None]
        answered = len(defn.members) - len(failed)
        quorum = defn.policy.quorum(len(defn.members))
        if answered < quorum:
            why = "; ".join(f"{member_label(m)}: {err}" for m, err in failed)
            raise DependencyUnavailable(
                f"ensemble {model.model_id}: {answered} of {len(defn.members)} members answered, {quorum} needed "
                f"(policy.min_members); {why}",
                retry_after_s=2,
                details={"failed": [{"model": member_label(m), "error": err} for m, err in failed], "quorum": quorum},
            )
        try:
            combined = dict(combine(defn, outputs, meta))
        except MatihError:
            raise
        except Exception as exc:  # noqa: BLE001 - members that disagree in shape are the ensemble's fault
            raise ModelError(f"ensemble {model.model_id}: combining the members' answers failed: {exc}") from None
        if not asked_probabilities:
            combined.pop("probabilities", None)
        combined = {k: _plain(v) for k, v in combined.items()}
        if failed:
            combined["degraded"] = True
            combined["failed"] = [{"model": member_label(m), "error": err} for m, err in failed]
        if explain:
            combined["members"] = [
                {
                    "model": member_label(m),
                    "weight": m.weight,
                    "output": _plain(out) if out is not None else None,
                    "latency_ms": round(seconds * 1000.0, 3),
                    **({"error": err} if err is not None else {}),
                }
                for m, (out, err, seconds) in zip(defn.members, results)
            ]
        return combined


def _plain(value: Any) -> Any:
    """numpy values as JSON-ready Python ones."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class EnsembleDispatch:
    """What the EndpointRouter calls for an ensemble leg: the fan-out in this process
    (``runner``) or in the Ensemble deployment (``remote(model, payload, config, explain,
    member_timeout_s)``),
    by :func:`runs_in_gateway`. Without ``remote`` (unit tests, the in-process benchmark) every
    ensemble runs here."""

    def __init__(self, runner: EnsembleRunner, remote: Callable[..., Awaitable[dict]] | None, inline_onnx: bool):
        self.runner = runner
        self.remote = remote
        self.inline_onnx = inline_onnx

    async def predict(
        self, model: ResolvedModel, payload: dict[str, Any], config: dict[str, Any] | None, explain: bool = False
    ) -> dict[str, Any]:
        defn = self.runner.definition(model)
        if self.remote is not None and not runs_in_gateway(defn, config, self.inline_onnx):
            limit = defn.policy.member_timeout_s or self.runner.timeout_s
            return await self.remote(model, payload, config, explain, limit)
        return await self.runner.run(model, payload, explain)


def ensemble_dispatch(
    predictor: Any,
    settings,
    *,
    fetch: Callable[[ResolvedModel], Path] | None = None,
    release: Callable[[Path], None] | None = None,
    remote: Callable[..., Awaitable[dict]] | None = None,
    on_loop: Callable[[PinnedMember], bool] = lambda member: False,
) -> EnsembleDispatch:
    """The dispatch of a process whose members go through ``predictor``: ``fetch`` / ``release``
    a version's artifacts (meta-learners; None = meta-learner ensembles cannot run here),
    ``remote`` the Ensemble deployment (None = every fan-out runs in this process), ``on_loop``
    which members run on this event loop (EnsembleRunner)."""
    runner = EnsembleRunner(
        predictor_caller(predictor), timeout_s=settings.serving.predict_timeout_s, fetch=fetch, release=release,
        on_loop=on_loop,
    )
    return EnsembleDispatch(runner, remote, settings.serving.inline_onnx)


def release_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def members_json(members: list[dict[str, Any]]) -> str:
    """The members' explanation as one string parameter (V2 parameters hold scalars only)."""
    return json.dumps(members, separators=(",", ":"), default=str)

"""Ensemble: the fan-out of ensemble versions placed on the model servers (see
app/ensembles/serving.py for where an ensemble runs). Each request calls every member on the
ModelServer replicas in parallel (multiplexed handle calls, ``asyncio.gather``) and combines
their answers. Its replicas do little but wait, so they reserve a fraction of a CPU and scale
on their own (serving.ensemble_*)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle


@serve.deployment(name="Ensemble", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class Ensemble:
    def __init__(
        self, settings_kwargs: dict[str, Any], model_server: DeploymentHandle, gpu_pool: DeploymentHandle | None = None
    ):
        """No credentials here: the meta-learners come from the RegistryCache, as the ModelServer's models do."""
        from actors.registry_cache import get_registry_cache
        from app.ensembles.serving import EnsembleRunner, predictor_caller, release_dir
        from app.settings import Settings
        from deployments.gateway import _ServePredictor
        from deployments.model_server import _fetch_from_object_store

        settings = Settings.from_shared(settings_kwargs)
        s = settings.serving
        cache = get_registry_cache(settings_kwargs, settings.actors.num_cpus)
        # Every member goes to a ModelServer replica (no inline host here), with the Gateway's
        # time limit, retries on a dead replica and error mapping.
        members = _ServePredictor(
            model_server, gpu_pool, grpc=s.handle_grpc, timeout_s=s.predict_timeout_s, retries=s.replica_retries
        )
        self.runner = EnsembleRunner(
            predictor_caller(members),
            timeout_s=s.predict_timeout_s,
            fetch=lambda model: _fetch_from_object_store(cache, model.model_id, s.model_fetch_timeout_s),
            release=release_dir,
        )

    async def run(self, model, payload: dict[str, Any], config: dict[str, Any] | None, explain: bool) -> Any:
        """The combined answer of ensemble version ``model`` (a ResolvedModel with its tags); a
        caller's error (bad payload) as the return value, which the Gateway raises (see
        ModelServer.predict for why not raised here)."""
        from app.errors import CALLER_ERRORS

        try:
            return await self.runner.run(model, payload, explain)
        except CALLER_ERRORS as exc:
            return exc

"""The Gateway's LRU of loaded models (app/serving/model_cache.py)."""

import asyncio

import pytest

from app.serving.model_cache import ModelCache


def test_one_load_per_model_for_concurrent_callers_and_lru_eviction():
    loads: list[str] = []

    async def load(model_id: str):
        loads.append(model_id)
        await asyncio.sleep(0.01)
        return f"runtime of {model_id}"

    async def scenario():
        cache = ModelCache(load, max_models=2)
        got = await asyncio.gather(*(cache("a/1") for _ in range(5)))
        assert got == ["runtime of a/1"] * 5 and loads == ["a/1"]
        await cache("b/1")
        await cache("a/1")  # a/1 is now the most recently used
        await cache("c/1")  # evicts b/1
        assert "a/1" in cache and "c/1" in cache and "b/1" not in cache and len(cache) == 2
        await cache("b/1")
        assert loads == ["a/1", "b/1", "c/1", "b/1"]

    asyncio.run(scenario())


def test_a_failed_load_reaches_every_waiter_and_is_not_cached():
    attempts = 0

    async def load(model_id: str):
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise RuntimeError("registry down")
        return "ok"

    async def scenario():
        cache = ModelCache(load, max_models=1)
        results = await asyncio.gather(cache("m/1"), cache("m/1"), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results) and attempts == 1
        assert await cache("m/1") == "ok" and attempts == 2

    asyncio.run(scenario())


def test_max_models_must_be_positive():
    with pytest.raises(ValueError):
        ModelCache(lambda m: None, 0)


def test_a_loader_fed_by_the_registry_cache_leaves_mlflow_client_settings_alone(tmp_path, monkeypatch):
    """The Gateway's ModelHost loads through the RegistryCache: building its loader must not
    switch the process's MLflow client to the retrying settings of a plain ModelRegistry."""
    import os

    from app.registry.mlflow_registry import configure_mlflow_client
    from app.serving.loader import ModelLoader
    from app.settings import load_settings

    settings = load_settings("local", matih_home=str(tmp_path))
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(key, os.environ.get(key, ""))
    configure_mlflow_client(5, retries=0)  # what the Gateway's serving registry sets
    loader = ModelLoader(settings, resolve=lambda model_id: None, fetch=lambda model: tmp_path)
    assert loader.registry is None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"

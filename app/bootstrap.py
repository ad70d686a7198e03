"""Start-up work done once, before any replica serves: schema migrations, the MLflow store,
the admin token. The application builder calls :func:`prepare`; so does ``matih-ml up``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from app.auth import ensure_admin_token
from app.settings import Settings
from app.storage.s3 import configure_s3_env
from app.store import MetadataStore

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    admin_token: str | None
    admin_token_file: Path | None


def prepare(settings: Settings) -> Prepared:
    configure_s3_env(settings)
    settings.matih_home.mkdir(parents=True, exist_ok=True)
    if not settings.artifact_root.startswith(("s3://", "gs://", "http://", "https://", "mlflow-artifacts:")):
        Path(settings.artifact_root).mkdir(parents=True, exist_ok=True)
    store = MetadataStore.from_settings(settings)
    try:
        store.migrate()
    finally:
        store.dispose()
    _prepare_mlflow(settings)
    _prepare_features(settings)
    token, path = (None, None)
    if settings.auth.enabled:
        token, path = ensure_admin_token(settings)
        if path is not None:
            print(f"matih-ml: admin token in {path} (mode 0600); `matih-ml` commands read it from there", flush=True)
    return Prepared(token, path)


def _prepare_features(settings: Settings) -> None:
    """Render the managed Feast repo (feature_store.yaml) and create Feast's registry tables,
    here, once, rather than racing in several replicas."""
    from app.features.repo import open_store

    open_store(settings, fresh=True).registry  # Feast creates its SQL registry's tables on first use


def _prepare_mlflow(settings: Settings) -> None:
    """Create MLflow's schema (SQLite) and the platform's experiment with its artifact root,
    here, once, rather than racing in several replicas."""
    from mlflow import MlflowClient

    from app.registry.mlflow_registry import ensure_experiment

    ensure_experiment(MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri), settings)

"""MATIH ML: a Ray-native MLOps platform. Domain code, importable without a Ray cluster."""

import os

__version__ = "0.1.0"

# MLflow's telemetry thread sets and unsets an environment variable (_MLFLOW_TELEMETRY_SESSION_ID)
# while other threads may iterate os.environ (pydantic-settings does when settings load):
# `matih-ml up` died once with a KeyError from that race. The platform sends nothing home anyway
# (clusters often have no internet); an operator's own value is kept.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

"""MATIH ML: a Ray-native MLOps platform. Domain code, importable without a Ray cluster."""

__version__ = "0.1.0"

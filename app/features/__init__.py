"""The feature store: Feast, managed by the platform.

- ``repo.py``: the managed repo at ``FEAST_REPO_PATH`` (``feature_store.yaml`` rendered from
  ``configs/feast/``), its registry (SQL: SQLite or a PostgreSQL schema), online store (SQLite or
  Redis) and batch engine (Feast's Ray compute engine); ``open_store`` gives a ``FeatureStore``.
- ``definitions.py``: entities, sources, feature views and services through ``FeatureStore.apply``.
- ``online.py``, ``enrichment.py``: online reads (one pipelined Redis round trip) and endpoint
  enrichment at predict time.
- ``jobs.py``: materialization and point-in-time historical sets as jobs; ``feast://`` datasets.
- ``push.py``, ``streams.py``: the push API and the StreamIngestor's Kafka / Redis Streams consumers.
"""

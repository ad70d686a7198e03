"""Canary rollouts: an endpoint moves from a baseline version to a candidate through traffic
steps, each judged on the same traffic window (``judge``), promoted or rolled back by the
``RolloutController`` (``controller``), its state durable in the metadata store (``store``)."""

"""Model monitoring and the closed loop.

- ``profile``: reference profiles (per feature: quantile sketch or exact values, category
  counts, missing rate; the prediction distribution and holdout probabilities), made at
  registration and stored as an artifact of the version.
- ``drift``: the drift tests behind one interface (``DriftTest``, a registry of named tests),
  the default choice per column, multiple-testing correction, dataset drift; run in parallel
  over column groups as Ray tasks.
- ``performance``: measured performance from the feedback join, with confidence intervals,
  and confidence-based performance estimation (CBPE) before labels arrive.
- ``report``: the HTML drift report.
- ``alerts``: rules over a run's outputs, de-duplication and cooldown, channels (webhook,
  events, Prometheus) and the alerts table.
- ``loop``: retraining policies and the chain a trigger sets off (training job -> gates ->
  challenger -> canary rollout -> promotion).
- ``spec``, ``store``, ``window``, ``service``: a monitor's spec, its rows, the log window it
  reads, and one run end to end (a ``monitor_run`` job).
"""

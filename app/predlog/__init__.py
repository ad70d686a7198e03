"""The prediction log: every prediction through an endpoint, buffered per Gateway replica,
written as parquet partitioned by endpoint and hour, joined with the feedback that arrives
later. ``app.predlog.read(endpoint, since, until)`` is the Ray Data reader."""

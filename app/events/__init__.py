"""Platform events: CloudEvents 1.0 written to the outbox table in the transaction of the change
they describe (``app.store``), read back (:mod:`app.events.outbox`) and published by the relay
(:mod:`app.events.relay`) to a sink (:mod:`app.events.sinks`: kafka, redis or none)."""

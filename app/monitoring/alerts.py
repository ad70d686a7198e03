"""Alerts: rules over a monitor run's outputs, the ``alerts`` table, and the channels that tell
people (a signed webhook, the event outbox, a Prometheus gauge).

A monitor run produces a flat dict of outputs (``{"drift.share": 0.6, "drift.feature[age]":
True, "performance.f1": 0.79, ...}``; keys absent when not computed). Each :class:`AlertRule`
is a condition on one of them. :class:`AlertService` turns a run's evaluations into alert rows
in one transaction of the metadata store, with their audit records and ``alert.*`` events:

- de-duplication: the fingerprint (endpoint + rule name) of a firing rule that already has an
  open alert (firing or acknowledged) counts on that alert (``fire_count``, ``last_fired_at``)
  instead of opening another, so a drifted feature does not page someone on every run;
- cooldown: a rule that fires again less than ``cooldown_s`` after its alert was resolved is
  suppressed (a metric flapping around its threshold opens one alert, not one per run), and a
  still-firing alert is notified again (a reminder) at most once per ``cooldown_s``;
- a rule that evaluates false resolves its open alert; a rule whose metric is absent from the
  outputs (not computed this run) neither fires nor resolves.

Channels: the ``events`` channel is the outbox itself (the EventRelay publishes ``alert.*`` to
Kafka / Redis Streams, docs/events.md); ``prometheus`` is ``matih_alerts_firing`` set by
:meth:`AlertService.export_gauges`; ``webhook`` deliveries are queued in the alert row
(``deliveries``) in the same transaction and sent afterwards by :meth:`AlertService.deliver_pending`
(the DriftMonitor actor calls it every few seconds), so a slow receiver never holds a
transaction and a crash between commit and send loses nothing.

Verifying a webhook (what a receiver does; Stripe's and GitHub's scheme): take the raw request
body and the ``X-Matih-Timestamp`` header, compute ``HMAC-SHA256(secret, f"{timestamp}.{body}")``
in hex and compare it in constant time with the hex after ``sha256=`` in ``X-Matih-Signature``;
refuse a timestamp more than a few minutes old (a replayed request). :func:`verify_signature`
is that check. ``X-Matih-Delivery`` is the same on every retry of one delivery: receivers
de-duplicate on it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import operator
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from sqlalchemy import String, cast, select
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.events import model as _m
from app.pagination import decode_page_token, encode_page_token, str_field
from app.redaction import redact
from app.store import MetadataStore
from app.store.models import Alert

__all__ = [
    "OPEN", "STATUSES", "SEVERITIES", "GRAMMAR", "AlertRule", "AlertChannel", "AlertsSpec", "Condition",
    "Evaluation", "parse_when", "evaluate", "fingerprint", "check_channels", "merge_secrets",
    "AlertChannelBase", "WebhookChannel", "EventsChannel", "PrometheusChannel", "CHANNELS",
    "sign", "verify_signature", "AlertService", "alert_dict",
]

STATUSES = ("firing", "acknowledged", "resolved")
OPEN = ("firing", "acknowledged")
SEVERITIES = ("info", "warning", "critical")
SYSTEM_ACTOR = "system:monitor"
_KEEP_FINISHED_DELIVERIES = 20  # per alert: every pending one, and the last finished ones

GRAMMAR = (
    "'<metric>' (fires when the output is true) or '<metric> <op> <number>' with op one of < <= > >= == !=; "
    "metric: drift.dataset | drift.share | drift.prediction | drift.feature[<name>] | drift.feature[*] (any "
    "feature; with an op: how many drifted) | drift.segment[<column>=<value>] | performance.<metric> | "
    "estimated.<metric> | predlog.drops | rows"
)
_METRIC = (
    r"rows|predlog\.drops|drift\.dataset|drift\.share|drift\.prediction"
    r"|drift\.feature\[[^\[\]]+\]|drift\.segment\[[^\[\]=]+=[^\[\]]*\]"
    r"|performance\.[A-Za-z0-9_]+|estimated\.[A-Za-z0-9_]+"
)
_WHEN = re.compile(
    rf"^\s*(?P<metric>{_METRIC})\s*(?:(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?))?\s*$"
)
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
_OP_WORDS = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
_ANY_FEATURE = "drift.feature[*]"
_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


@dataclass(frozen=True)
class Condition:
    """A parsed ``when``: the metric, and the comparison (None for a truthiness rule)."""

    metric: str
    op: str | None = None
    threshold: float | None = None


@lru_cache(maxsize=4096)
def parse_when(when: str) -> Condition:
    """The condition in ``when``; ValueError (showing the grammar) when it is not one."""
    m = _WHEN.match(when) if isinstance(when, str) else None
    if m is None:
        raise ValueError(f"when {when!r} is not a condition; write {GRAMMAR}")
    number = m["number"]
    threshold = float(number) if number is not None else None
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"when {when!r}: the threshold must be a finite number; write {GRAMMAR}")
    return Condition(m["metric"], m["op"], threshold)


def _slug(when: str) -> str:
    """A rule name made from its condition: ``drift.share > 0.5`` -> ``drift.share-gt-0.5``."""
    text = when.strip().lower()
    for op in ("<=", ">=", "==", "!=", "<", ">"):  # two-character operators first
        text = text.replace(op, f" {_OP_WORDS[op]} ")
    text = re.sub(r"[^a-z0-9_.]+", "-", text.replace("*", "any")).strip("-._")
    return (text or "rule")[:64].rstrip("-._") or "rule"


class AlertRule(BaseModel):
    """One condition on a monitor run's outputs that opens an alert while it holds."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "", pattern=_NAME,
        description="The rule's name, unique in the monitor (with the endpoint it is the alert's fingerprint); "
        "default: made from `when` (`drift.share > 0.5` -> `drift.share-gt-0.5`).",
    )
    when: str = Field(
        ..., description=f"The condition: {GRAMMAR}. A rule whose metric the run did not compute neither fires "
        "nor resolves.", examples=["drift.dataset", "drift.share > 0.3", "performance.f1 < 0.7", "drift.feature[*]"],
    )
    severity: Literal["info", "warning", "critical"] = Field("warning", description="How urgent the alert is.")
    cooldown_s: float = Field(
        3600.0, ge=0, description="Seconds after the alert resolves during which the rule firing again is suppressed "
        "(no new alert, nothing notified); also the least time between two reminders of an alert still firing.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("when"), str):
            data = {**data, "name": _slug(data["when"])}
        return data

    @field_validator("when")
    @classmethod
    def _check_when(cls, value: str, info) -> str:
        try:
            parse_when(value)
        except ValueError as exc:
            name = info.data.get("name") or "(unnamed)"
            raise ValueError(f"alert rule {name!r}: {exc}") from None
        return value

    @property
    def condition(self) -> Condition:
        return parse_when(self.when)


class AlertChannel(BaseModel):
    """Where alerts go. ``events`` (the ``alert.*`` events on Kafka / Redis Streams) and
    ``prometheus`` (the ``matih_alerts_firing`` gauge) need nothing more; ``webhook`` POSTs each
    new, reminded and resolved alert as signed JSON to ``url``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["webhook", "events", "prometheus"] = Field(..., description="The kind of channel.")
    url: str | None = Field(
        None, max_length=2048, description="webhook only: the http(s) URL alerts are POSTed to. Its host must be "
        "in the setting monitoring.webhook_allowed_hosts.",
    )
    secret: SecretStr | None = Field(
        None, description="webhook only: the HMAC-SHA256 key of the X-Matih-Signature header (write-only: never "
        "returned). Without one, requests are not signed.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="webhook only: extra request headers (an Authorization for the receiver). "
        "Content-Type and X-Matih-* are the platform's own.",
    )

    @model_validator(mode="after")
    def _check(self) -> AlertChannel:
        if self.type != "webhook":
            if self.url is not None or self.secret is not None or self.headers:
                raise ValueError(f"alert channel {self.type!r} takes no url, secret or headers (only webhook does)")
            return self
        if not self.url:
            raise ValueError("a webhook alert channel needs a url (http:// or https://)")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook url {redact(self.url)!r} is not an http:// or https:// URL with a host")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError(f"webhook url {redact(self.url)!r} has an invalid port") from None
        for key, value in self.headers.items():
            low = key.lower()
            if low == "content-type" or low.startswith("x-matih-") or low in ("host", "content-length"):
                raise ValueError(f"webhook header {key!r} is set by the platform; remove it")
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", key) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"webhook header {key!r} is not a valid HTTP header name and value")
        return self

    def public(self) -> dict[str, Any]:
        """The channel as the API shows it: the secret never, only whether one is set."""
        out: dict[str, Any] = {"type": self.type}
        if self.type == "webhook":
            out.update(url=redact(self.url or ""), secret_set=self.secret is not None,
                       headers={k: "***" for k in self.headers})
        return out

    def stored(self) -> dict[str, Any]:
        """The channel as it is stored (the secret in clear: the metadata store holds it)."""
        out = self.model_dump(exclude={"secret"})
        out["secret"] = self.secret.get_secret_value() if self.secret is not None else None
        return out


def _default_channels() -> list[AlertChannel]:
    return [AlertChannel(type="events"), AlertChannel(type="prometheus")]


class AlertsSpec(BaseModel):
    """A monitor's alerting: its rules and the channels their alerts go to."""

    model_config = ConfigDict(extra="forbid")

    rules: list[AlertRule] = Field(default_factory=list, description="The alert rules, evaluated after every run.")
    channels: list[AlertChannel] = Field(
        default_factory=_default_channels, description="Where alerts go; events and prometheus by default, a "
        "webhook only when listed.",
    )

    @model_validator(mode="after")
    def _unique(self) -> AlertsSpec:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two alert rules are named {rule.name!r}; give each rule its own name")
            seen.add(rule.name)
        return self

    def public(self) -> dict[str, Any]:
        return {"rules": [r.model_dump() for r in self.rules], "channels": [c.public() for c in self.channels]}

    def stored(self) -> dict[str, Any]:
        return {"rules": [r.model_dump() for r in self.rules], "channels": [c.stored() for c in self.channels]}


def merge_secrets(new: AlertsSpec, old: AlertsSpec | None) -> AlertsSpec:
    """``new`` with each webhook channel that has no secret keeping the secret of ``old``'s
    channel of the same url: the API never returns secrets, so a client that PUTs back the spec it
    read must not erase them."""
    if old is None:
        return new
    secrets = {c.url: c.secret for c in old.channels if c.type == "webhook" and c.secret is not None}
    channels = [c.model_copy(update={"secret": secrets[c.url]}) if c.type == "webhook" and c.secret is None
                and c.url in secrets else c for c in new.channels]
    return new.model_copy(update={"channels": channels})


# -- evaluation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """A rule against one run's outputs. ``present`` False: its metric was not computed, so
    the rule neither fires nor resolves."""

    rule: AlertRule
    fired: bool
    value: Any
    threshold: float | None
    present: bool = True
    detail: dict[str, Any] | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _one(rule: AlertRule, outputs: Mapping[str, Any]) -> Evaluation:
    cond = rule.condition
    detail = None
    if cond.metric == _ANY_FEATURE:
        keys = [k for k in outputs if k.startswith("drift.feature[") and k.endswith("]")]
        if not keys:
            return Evaluation(rule, False, None, cond.threshold, present=False)
        drifted = sorted(k[len("drift.feature["):-1] for k in keys if outputs[k] is True)
        value: Any = len(drifted)
        detail = {"drifted": drifted[:100]}
    else:
        if outputs.get(cond.metric) is None:
            return Evaluation(rule, False, None, cond.threshold, present=False)
        value = outputs[cond.metric]
    if cond.op is None:
        fired = bool(value) if isinstance(value, (bool, int, float)) and not (
            isinstance(value, float) and math.isnan(value)) else None
    else:
        x = _number(value)
        fired = None if x is None else _OPS[cond.op](x, cond.threshold)
    if fired is None:  # NaN, or not a number: as good as not computed
        return Evaluation(rule, False, value if isinstance(value, (bool, int, str)) else None, cond.threshold,
                          present=False)
    return Evaluation(rule, bool(fired), value, cond.threshold, True, detail)


def evaluate(rules: list[AlertRule], outputs: Mapping[str, Any]) -> list[Evaluation]:
    """Each rule against ``outputs``, in the rules' order."""
    return [_one(rule, outputs) for rule in rules]


def fingerprint(endpoint: str, rule: str) -> str:
    """What de-duplicates alerts: one open alert per endpoint and rule."""
    return hashlib.sha256(f"{endpoint}\x00{rule}".encode()).hexdigest()[:32]


# -- channels --------------------------------------------------------------------------------
def _host_allowed(url: str, allowed: list[str]) -> bool:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allowed = [a.strip().lower() for a in allowed]
    return host in allowed or f"{host}:{port}" in allowed or f"[{host}]:{port}" in allowed


class AlertChannelBase(ABC):
    """One kind of alert channel. ``check`` refuses a channel at PUT time; ``queue`` says what
    the channel records in the alert's transaction when an alert is notified (a pending delivery,
    or None when the transaction itself is the notification: the events of the outbox);
    ``deliver`` sends a queued delivery afterwards (channels that queue nothing need none)."""

    type: ClassVar[str]

    def check(self, channel: AlertChannel, index: int, settings) -> None:  # noqa: B027 - optional
        """Raise InvalidInput naming ``alerts.channels[index]`` when the channel cannot be used."""

    @abstractmethod
    def queue(self, channel: AlertChannel, index: int, event: str, now: datetime) -> dict[str, Any] | None:
        """The delivery to record for an ``event`` (alert.fired | alert.resolved) of an alert."""

    def deliver(self, channel: AlertChannel, delivery: dict[str, Any], payload: dict[str, Any],
                settings) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} queues nothing to deliver")


class EventsChannel(AlertChannelBase):
    """The ``alert.*`` events written in the alert's transaction (the outbox); nothing else."""

    type = "events"

    def queue(self, channel, index, event, now):
        return None


class PrometheusChannel(AlertChannelBase):
    """``matih_alerts_firing``, set from the table by :meth:`AlertService.export_gauges`."""

    type = "prometheus"

    def queue(self, channel, index, event, now):
        return None


class _Retryable(Exception):
    """A webhook attempt worth repeating: no connection, a timeout, a 5xx or 429 answer."""


class WebhookChannel(AlertChannelBase):
    """A signed JSON POST per notification, retried with exponential backoff (tenacity)."""

    type = "webhook"

    def check(self, channel, index, settings):
        allowed = settings.monitoring.webhook_allowed_hosts
        if not _host_allowed(channel.url or "", allowed):
            host = urlsplit(channel.url or "").hostname
            raise InvalidInput(
                f"webhook host {host!r} is not allowed; add it to the setting monitoring.webhook_allowed_hosts "
                f"(MATIH_MONITORING; now {sorted(allowed)}) or send alerts elsewhere",
                details={"field": f"alerts.channels[{index}].url"},
            )

    def queue(self, channel, index, event, now):
        return {"id": uuid.uuid4().hex, "channel": index, "type": "webhook", "url": channel.url, "event": event,
                "status": "pending", "attempts": 0, "last_error": None, "at": now.isoformat()}

    def deliver(self, channel, delivery, payload, settings):
        """Send ``payload`` to the channel's url; the delivery's new fields (status, attempts,
        last_error, http_status)."""
        import httpx
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

        mon = settings.monitoring
        if not _host_allowed(channel.url or "", mon.webhook_allowed_hosts):  # the allow-list may have changed
            return {"status": "failed", "last_error": "host no longer in monitoring.webhook_allowed_hosts"}
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode()
        attempts = 0
        last: dict[str, Any] = {}

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            ts = str(int(time.time()))
            headers = {**channel.headers, "Content-Type": "application/json", "X-Matih-Event": delivery["event"],
                       "X-Matih-Delivery": delivery["id"], "X-Matih-Timestamp": ts}
            if channel.secret is not None:
                headers["X-Matih-Signature"] = sign(channel.secret.get_secret_value(), ts, body)
            try:  # redirects are not followed: the allow-list names where alerts may go
                answer = httpx.post(channel.url, content=body, headers=headers, timeout=mon.webhook_timeout_s,
                                    follow_redirects=False)
            except httpx.HTTPError as exc:
                last.update(http_status=None, last_error=redact(f"{type(exc).__name__}: {exc}")[:500])
                raise _Retryable() from exc
            last.update(http_status=answer.status_code, last_error=None if answer.is_success else
                        f"HTTP {answer.status_code}: {answer.text[:200]}")
            if answer.status_code >= 500 or answer.status_code == 429:
                raise _Retryable()

        retrying = Retrying(
            stop=stop_after_attempt(mon.webhook_max_attempts), reraise=True,
            wait=wait_exponential(multiplier=mon.webhook_backoff_s, exp_base=2, max=30),
            retry=retry_if_exception_type(_Retryable),
        )
        try:
            retrying(attempt)
        except _Retryable:
            pass
        ok = last.get("http_status") is not None and 200 <= last["http_status"] < 300
        return {"status": "delivered" if ok else "failed", "attempts": delivery.get("attempts", 0) + attempts, **last}


CHANNELS: dict[str, AlertChannelBase] = {c.type: c for c in (WebhookChannel(), EventsChannel(), PrometheusChannel())}


def check_channels(channels: list[AlertChannel], settings) -> None:
    """What the API calls at PUT time: InvalidInput (422) naming ``alerts.channels[i].url`` for
    a channel that cannot be used (a webhook host not on the allow-list)."""
    for i, channel in enumerate(channels):
        CHANNELS[channel.type].check(channel, i, settings)


def sign(secret: str, timestamp: str | int, body: bytes | str) -> str:
    """The ``X-Matih-Signature`` value: ``sha256=`` + hex HMAC-SHA256(secret, f"{timestamp}.{body}")."""
    raw = body.encode() if isinstance(body, str) else body
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + raw, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify_signature(secret: str, timestamp: str | int, body: bytes | str, header: str | None,
                     tolerance_s: float = 300, *, now: float | None = None) -> bool:
    """Whether ``header`` (X-Matih-Signature) signs ``body`` at ``timestamp`` (X-Matih-Timestamp)
    with ``secret``, and the timestamp is within ``tolerance_s`` of now (an old request replayed
    fails). What a receiver runs on the raw body, before parsing it."""
    try:
        ts = int(str(timestamp))
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    if not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(sign(secret, ts, body).encode(), header.strip().encode())


# -- the service -----------------------------------------------------------------------------
def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value  # SQLite drops the zone


def _iso(value: datetime | None) -> str | None:
    value = _aware(value)
    return None if value is None else value.isoformat()


def alert_dict(row: Alert) -> dict[str, Any]:
    """An alert as the API and the webhook show it (delivery urls without credentials)."""
    deliveries = [{**d, "url": redact(d["url"]) if d.get("url") else d.get("url")} for d in (row.deliveries or [])]
    return {
        "id": row.id, "endpoint": row.endpoint, "rule": row.rule, "fingerprint": row.fingerprint,
        "severity": row.severity, "status": row.status, "metric": row.metric, "value": row.value,
        "message": row.message, "run_id": row.run_id, "fire_count": row.fire_count,
        "first_fired_at": _iso(row.first_fired_at), "last_fired_at": _iso(row.last_fired_at),
        "notified_at": _iso(row.notified_at), "deliveries": deliveries, "acked_by": row.acked_by,
        "acked_at": _iso(row.acked_at), "resolved_at": _iso(row.resolved_at),
    }


def _event_data(alert: dict[str, Any], **extra: Any) -> dict[str, Any]:
    value = alert.get("value") or {}
    data = {"alert_id": alert["id"], "endpoint": alert["endpoint"], "rule": alert["rule"],
            "severity": alert["severity"], "status": alert["status"], "metric": alert["metric"],
            "value": value.get("value"), "threshold": value.get("threshold"), "message": alert["message"],
            "run_id": alert["run_id"], "fire_count": alert["fire_count"]}
    data.update(extra)
    return data


def _message(endpoint: str, ev: Evaluation) -> str:
    shown = ev.value if not isinstance(ev.value, float) else round(ev.value, 6)
    tail = f"; drifted: {', '.join(ev.detail['drifted'][:10])}" if ev.detail and ev.detail.get("drifted") else ""
    return f"endpoint {endpoint!r}: {ev.rule.when} (value {shown}){tail}"


class AlertService:
    """The ``alerts`` table: opening, counting, resolving and acknowledging alerts, and the
    webhook deliveries queued in each row. Every change commits with its audit record and
    ``alert.*`` event in one transaction of the metadata store."""

    def __init__(self, store: MetadataStore, settings, clock: Callable[[], datetime] | None = None):
        self.store = store
        self.settings = settings
        self._clock = clock or (lambda: datetime.now(timezone.utc))

    def _now(self) -> datetime:
        return _aware(self._clock())

    # -- a run's outputs -------------------------------------------------------------------------
    def process(self, endpoint: str, run_id: str | None, spec: AlertsSpec, outputs: Mapping[str, Any]
                ) -> list[dict[str, Any]]:
        """Evaluate ``spec``'s rules on a run's ``outputs`` and apply them to the table; per rule
        ``{"rule", "fired", "value", "threshold", "outcome", "alert_id"}`` with outcome one of
        opened | repeated | reminded | suppressed | resolved | ok | absent; then one "resolved" entry
        per open alert of the endpoint whose rule is no longer in ``spec`` (removed or renamed)."""
        now = self._now()
        results = []
        with self.store.transaction() as s:
            for seq, ev in enumerate(evaluate(spec.rules, outputs)):
                outcome, alert_id = self._apply(s, endpoint, run_id, spec, ev, now, seq)
                results.append({"rule": ev.rule.name, "when": ev.rule.when, "severity": ev.rule.severity,
                                "fired": ev.fired, "value": ev.value, "threshold": ev.threshold,
                                "outcome": outcome, "alert_id": alert_id})
            # An open alert of a rule no longer in the spec (removed or renamed) would stay open
            # for ever: nothing evaluates it again.
            names = [r.name for r in spec.rules]
            for row in s.scalars(select(Alert).where(Alert.endpoint == endpoint, Alert.status.in_(OPEN),
                                                     Alert.rule.not_in(names)).order_by(Alert.id).with_for_update()):
                self._resolve(s, row, spec, now, run_id, reason="rule removed")
                results.append({"rule": row.rule, "when": None, "severity": row.severity, "fired": False,
                                "value": None, "threshold": None, "outcome": "resolved", "alert_id": row.id})
        return results

    def close_endpoint(self, endpoint: str, actor: str) -> int:
        """Resolve every open alert of ``endpoint`` (its monitor was deleted); nothing is
        delivered (the monitor's channels are gone). The number resolved."""
        now = self._now()
        with self.store.transaction() as s:
            rows = list(s.scalars(select(Alert).where(Alert.endpoint == endpoint, Alert.status.in_(OPEN))
                                  .order_by(Alert.id).with_for_update()))
            for row in rows:
                self._resolve(s, row, AlertsSpec(channels=[]), now, None, reason="monitor deleted", actor=actor)
        return len(rows)

    def _resolve(self, s: Session, row: Alert, spec: AlertsSpec, now: datetime, run_id: str | None, *,
                 reason: str, actor: str = SYSTEM_ACTOR) -> None:
        before = row.status
        row.status, row.resolved_at = "resolved", now
        row.deliveries = self._queued(row.deliveries, spec, _m.ALERT_RESOLVED, now)
        s.flush()
        after = alert_dict(row)
        MetadataStore._audit(s, actor, "alert.resolve", "alert", row.id, {"status": before},
                             {"status": "resolved", "run_id": run_id, "reason": reason})
        self.store._event(s, (_m.ALERT_RESOLVED, _m.alert_subject(row.id),
                              _event_data(after, resolved_by_run=run_id, reason=reason)))

    def _apply(self, s: Session, endpoint: str, run_id: str | None, spec: AlertsSpec, ev: Evaluation,
               now: datetime, seq: int) -> tuple[str, str | None]:
        if not ev.present:
            return "absent", None
        rule = ev.rule
        fp = fingerprint(endpoint, rule.name)
        current = s.scalars(select(Alert).where(Alert.fingerprint == fp, Alert.status.in_(OPEN))
                            .order_by(Alert.id.desc()).with_for_update()).first()
        value = {"value": ev.value, "threshold": ev.threshold, "op": rule.condition.op, "when": rule.when,
                 **({"detail": ev.detail} if ev.detail else {})}
        if not ev.fired:
            if current is None:
                return "ok", None
            self._resolve(s, current, spec, now, run_id, reason="rule cleared")
            return "resolved", current.id
        if current is not None:
            current.fire_count = (current.fire_count or 0) + 1
            current.last_fired_at, current.run_id, current.severity = now, run_id, rule.severity
            current.value = {**value, **({"ack_note": current.value["ack_note"]}
                                         if isinstance(current.value, dict) and "ack_note" in current.value else {})}
            current.message = _message(endpoint, ev)
            notified = _aware(current.notified_at)
            if current.status == "firing" and (notified is None or
                                               now - notified >= timedelta(seconds=rule.cooldown_s)):
                current.deliveries = self._queued(current.deliveries, spec, _m.ALERT_FIRED, now, reminder=True)
                current.notified_at = now
                return "reminded", current.id
            return "repeated", current.id
        last = s.scalars(select(Alert).where(Alert.fingerprint == fp, Alert.status == "resolved")
                         .order_by(Alert.resolved_at.desc()).limit(1)).first()
        if last is not None and last.resolved_at is not None and \
                now - _aware(last.resolved_at) < timedelta(seconds=rule.cooldown_s):
            return "suppressed", last.id
        # Ids sort by creation time: a millisecond prefix, the rule's place in the run, then randomness.
        alert_id = f"{int(now.timestamp() * 1000):012x}{seq % 0x10000:04x}{uuid.uuid4().hex[:16]}"
        row = Alert(id=alert_id, endpoint=endpoint, rule=rule.name, fingerprint=fp, severity=rule.severity,
                    status="firing", metric=rule.condition.metric[:256], value=value, message=_message(endpoint, ev),
                    run_id=run_id, fire_count=1, first_fired_at=now, last_fired_at=now, notified_at=now,
                    deliveries=self._queued([], spec, _m.ALERT_FIRED, now), acked_by=None, acked_at=None,
                    resolved_at=None)
        s.add(row)
        s.flush()
        after = alert_dict(row)
        MetadataStore._audit(s, SYSTEM_ACTOR, "alert.fire", "alert", alert_id, None,
                             {k: after[k] for k in ("endpoint", "rule", "severity", "status", "value", "run_id")})
        self.store._event(s, (_m.ALERT_FIRED, _m.alert_subject(alert_id), _event_data(after)))
        return "opened", alert_id

    @staticmethod
    def _queued(deliveries: list | None, spec: AlertsSpec, event: str, now: datetime, *,
                reminder: bool = False) -> list[dict[str, Any]]:
        """``deliveries`` plus one per channel that queues one; finished ones beyond the last
        few dropped (a long-firing alert's reminders would grow the row without bound)."""
        old = list(deliveries or [])
        pending = [d for d in old if d.get("status") == "pending"]
        done = [d for d in old if d.get("status") != "pending"][-_KEEP_FINISHED_DELIVERIES:]
        new = []
        for i, channel in enumerate(spec.channels):
            d = CHANNELS[channel.type].queue(channel, i, event, now)
            if d is not None:
                new.append({**d, "reminder": reminder})
        return [*done, *pending, *new]

    # -- webhook deliveries ----------------------------------------------------------------------
    def deliver_pending(self, spec_lookup: Callable[[str], AlertsSpec], limit: int = 100) -> int:
        """Send every pending delivery (oldest alert first, at most ``limit`` alerts a call) and
        record each outcome; the number of deliveries that reached their receiver.
        ``spec_lookup(endpoint)`` gives the endpoint's channels as they are now (the row holds
        no secrets); an endpoint whose spec is gone, or whose channel was removed, fails them."""
        with self.store.transaction() as s:
            rows = list(s.scalars(select(Alert).where(cast(Alert.deliveries, String).like('%"pending"%'))
                                  .order_by(Alert.id).limit(limit)))
            work = [(alert_dict(r), [d for d in (r.deliveries or []) if d.get("status") == "pending"]) for r in rows]
        delivered = 0
        specs: dict[str, AlertsSpec | None] = {}
        for alert, pending in work:
            if alert["endpoint"] not in specs:
                try:
                    specs[alert["endpoint"]] = spec_lookup(alert["endpoint"])
                except (NotFound, KeyError):
                    specs[alert["endpoint"]] = None
            spec = specs[alert["endpoint"]]
            for d in pending:
                channel = self._channel(spec, d)
                if channel is None:
                    outcome = {"status": "failed", "last_error": "the channel is no longer in the monitor's alerts"}
                else:
                    try:
                        outcome = CHANNELS[channel.type].deliver(channel, d, self._payload(alert, d), self.settings)
                    except Exception as exc:  # noqa: BLE001 - recorded; never retried for ever each tick
                        outcome = {"status": "failed", "last_error": redact(f"{type(exc).__name__}: {exc}")[:500]}
                outcome["at"] = self._now().isoformat()
                delivered += outcome["status"] == "delivered"
                self._record(alert["id"], d["id"], outcome)
        return delivered

    @staticmethod
    def _channel(spec: AlertsSpec | None, delivery: dict[str, Any]) -> AlertChannel | None:
        if spec is None:
            return None
        i = delivery.get("channel")
        if isinstance(i, int) and 0 <= i < len(spec.channels) and spec.channels[i].type == delivery["type"] \
                and spec.channels[i].url == delivery.get("url"):
            return spec.channels[i]
        same = [c for c in spec.channels if c.type == delivery["type"] and c.url == delivery.get("url")]
        return same[0] if same else None

    @staticmethod
    def _payload(alert: dict[str, Any], delivery: dict[str, Any]) -> dict[str, Any]:
        public = {k: v for k, v in alert.items() if k != "deliveries"}
        value = alert.get("value") or {}
        return {"event": delivery["event"], "delivery": delivery["id"], "reminder": bool(delivery.get("reminder")),
                "alert": public, "endpoint": alert["endpoint"], "status": alert["status"],
                "severity": alert["severity"], "rule": alert["rule"], "metric": alert["metric"],
                "value": value.get("value"), "threshold": value.get("threshold"), "message": alert["message"]}

    def _record(self, alert_id: str, delivery_id: str, outcome: dict[str, Any]) -> None:
        with self.store.transaction() as s:
            row = s.get(Alert, alert_id, with_for_update=True)
            if row is None:
                return
            row.deliveries = [{**d, **outcome} if d.get("id") == delivery_id else d for d in (row.deliveries or [])]

    # -- reading and acknowledging ---------------------------------------------------------------
    def get(self, alert_id: str) -> dict[str, Any]:
        with self.store.transaction() as s:
            row = s.get(Alert, alert_id)
            if row is None:
                raise NotFound(f"alert {alert_id!r} does not exist; GET /v1/alerts lists them")
            return alert_dict(row)

    def list(self, endpoint: str | None = None, status: str | None = None, severity: str | None = None,
             limit: int = 100, page_token: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first (ids sort by creation time)."""
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"status {status!r} is not one of {', '.join(STATUSES)}", details={"field": "status"})
        if severity is not None and severity not in SEVERITIES:
            raise InvalidInput(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}",
                               details={"field": "severity"})
        key = decode_page_token(page_token, str_field)
        with self.store.transaction() as s:
            q = select(Alert).order_by(Alert.id.desc()).limit(limit + 1)
            if endpoint is not None:
                q = q.where(Alert.endpoint == endpoint)
            if status is not None:
                q = q.where(Alert.status == status)
            if severity is not None:
                q = q.where(Alert.severity == severity)
            if key:
                q = q.where(Alert.id < key[0])
            rows = list(s.scalars(q))
            items = [alert_dict(r) for r in rows[:limit]]
        return items, (encode_page_token(rows[limit - 1].id) if len(rows) > limit else None)

    def ack(self, alert_id: str, actor: str, note: str | None = None) -> dict[str, Any]:
        """Acknowledge a firing alert: it stays open (counted, resolved when its rule clears) but
        is not reminded. Acknowledging it again returns it unchanged; a resolved one is a Conflict."""
        with self.store.transaction() as s:
            row = s.get(Alert, alert_id, with_for_update=True)
            if row is None:
                raise NotFound(f"alert {alert_id!r} does not exist; GET /v1/alerts lists them")
            if row.status == "acknowledged":
                return alert_dict(row)
            if row.status != "firing":
                raise Conflict(f"alert {alert_id} is {row.status}; only a firing alert can be acknowledged",
                               details={"status": row.status})
            row.status, row.acked_by, row.acked_at = "acknowledged", actor, self._now()
            if note:
                row.value = {**(row.value or {}), "ack_note": note}
            s.flush()
            after = alert_dict(row)
            MetadataStore._audit(s, actor, "alert.ack", "alert", alert_id, {"status": "firing"},
                                 {"status": "acknowledged", "note": note})
            self.store._event(s, (_m.ALERT_ACKNOWLEDGED, _m.alert_subject(alert_id),
                                  _event_data(after, acked_by=actor, note=note)))
        return after

    # -- the prometheus channel ------------------------------------------------------------------
    def export_gauges(self) -> dict[tuple[str, str, str], int]:
        """Set ``matih_alerts_firing{endpoint,rule,severity}``: 1 per open alert, 0 for those this
        process set before that have closed; returns the values set from the table."""
        from app import metrics

        with self.store.transaction() as s:
            open_ = {tuple(r) for r in s.execute(select(Alert.endpoint, Alert.rule, Alert.severity)
                                                 .where(Alert.status.in_(OPEN)).distinct())}
        values = {key: 1 for key in open_}
        metrics.alerts_firing(values)
        return values

"""The outbox of platform events: reading it (``GET /v1/events``) and the relay's bookkeeping.

Rows are written by ``app.store.MetadataStore`` in the transaction of each change; ``id``
numbers them in commit order (the ``sequence`` of each event). The relay takes the oldest
unpublished rows in ``id`` order, marks them published once the sink acknowledged them, and
records failed attempts on them; published rows stay ``events.keep_published_days`` and are
then purged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.errors import DependencyUnavailable, InvalidInput
from app.events.model import CloudEvent
from app.pagination import decode_page_token, encode_page_token, int_field
from app.store.models import Event

_TYPE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")
_MAX_ERROR_CHARS = 2000


def check_type_filter(type_: str) -> str:
    """``type_`` as a filter (a type or a dotted prefix of types), or InvalidInput naming the fix."""
    if len(type_) > 64 or not _TYPE.match(type_):
        shown = type_ if len(type_) <= 64 else type_[:61] + "..."
        raise InvalidInput(
            f"type {shown!r} is not an event type or a prefix of one: dotted lowercase words such as "
            "'training.job', 'model.version.registered' or 'endpoint'",
            details={"field": "type"},
        )
    return type_


class Outbox:
    """The ``events`` table of a :class:`app.store.MetadataStore`."""

    def __init__(self, store):
        self.store = store

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with Session(self.store.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except OperationalError as exc:
            raise DependencyUnavailable(f"metadata store unreachable: {exc.orig}") from None

    # -- reading ------------------------------------------------------------------------------
    def read(
        self, *, since: datetime | str | None = None, type_: str | None = None, limit: int = 100,
        page_token: str | None = None,
    ) -> tuple[list[dict], str | None]:
        """Events oldest first, as CloudEvents JSON, and the next page's token (None at the end).

        ``since``: a time (events at or after it), an event's ``id`` or its ``sequence`` as a
        string of digits (events after that one). ``type_``: a type, or a dotted prefix of
        types (``training.job`` matches every ``training.job.*``)."""
        key = decode_page_token(page_token, int_field)
        with self._session() as s:
            q = select(Event).order_by(Event.id).limit(limit + 1)
            if isinstance(since, datetime):
                q = q.where(Event.time >= _utc(since))
            elif since is not None:
                q = q.where(Event.id > self._sequence_of(s, since))
            if type_:
                check_type_filter(type_)
                q = q.where((Event.type == type_) | Event.type.startswith(type_ + ".", autoescape=True))
            if key:
                q = q.where(Event.id > key[0])
            rows = list(s.scalars(q))
        items = [CloudEvent.from_row(r).to_json() for r in rows[:limit]]
        nxt = encode_page_token(rows[limit - 1].id) if len(rows) > limit else None
        return items, nxt

    @staticmethod
    def _sequence_of(s: Session, since: str) -> int:
        if since.isascii() and since.isalnum() and len(since) <= 64:  # event ids are hex; never a NUL to PostgreSQL
            row_id = s.scalars(select(Event.id).where(Event.event_id == since)).first()
            if row_id is not None:
                return row_id
            if since.isdigit() and len(since) <= 18:
                return int(since)
        shown = since if len(since) <= 64 else since[:61] + "..."
        raise InvalidInput(
            f"since {shown!r} is not an RFC 3339 time, an event's sequence, or the id of an event in the outbox "
            "(published events are kept events.keep_published_days); pass e.g. 2026-01-31T00:00:00Z",
            details={"field": "since"},
        )

    def depth(self) -> int:
        """Events not yet published."""
        with self._session() as s:
            return int(s.scalar(select(func.count()).select_from(Event).where(Event.published_at.is_(None))) or 0)

    # -- the relay's side ---------------------------------------------------------------------
    def unpublished(self, limit: int) -> list[CloudEvent]:
        """The oldest ``limit`` unpublished events, in outbox order."""
        with self._session() as s:
            q = select(Event).where(Event.published_at.is_(None)).order_by(Event.id).limit(limit)
            return [CloudEvent.from_row(r) for r in s.scalars(q)]

    def mark_published(self, sequences: list[int]) -> None:
        if not sequences:
            return
        with self._session() as s:
            s.execute(update(Event).where(Event.id.in_(sequences)).values(published_at=_now()))

    def record_failure(self, sequences: list[int], error: str) -> None:
        """One more failed attempt on each of these events, with the sink's error."""
        if not sequences:
            return
        with self._session() as s:
            s.execute(
                update(Event).where(Event.id.in_(sequences))
                .values(attempts=Event.attempts + 1, last_error=error[:_MAX_ERROR_CHARS])
            )

    def purge(self, keep_days: int, *, unpublished_too: bool = False) -> int:
        """Delete published events older than ``keep_days`` (with ``unpublished_too``, every
        event that old: the ``none`` sink, where nothing publishes them); returns how many."""
        cutoff = _now() - timedelta(days=keep_days)
        with self._session() as s:
            if unpublished_too:
                q = delete(Event).where(Event.time < cutoff)
            else:
                q = delete(Event).where(Event.published_at.is_not(None), Event.published_at < cutoff)
            return int(s.execute(q).rowcount or 0)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

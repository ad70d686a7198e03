"""Page tokens: the one parser for every ``page_token`` the API takes.

A page token is opaque to callers; whatever they send comes back as 422
``invalid_page_token`` naming the field, never as a 500 from deep inside a store. Two
layouts exist, both checked here before anything else reads them:

- the metadata store's lists (endpoints, jobs, audit) issue ``encode_page_token(*key)``:
  URL-safe base64 of a JSON list, the sort key of the last row sent. ``decode_page_token``
  takes one converter per key field and turns any failure into ``invalid_page_token``;
- MLflow's lists (models, versions, experiments, runs) pass MLflow's own token through
  unchanged: standard base64 of ``{"offset": n}`` (``mlflow.utils.search_utils.SearchUtils``,
  the same on a tracking server). ``mlflow_page_token`` checks that layout and bounds the
  offset, because MLflow's parser lets non-ASCII text, a JSON list or an offset past the
  database's integer range escape as an unexpected error.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from app.errors import InvalidInput

MAX_TOKEN_CHARS = 1024
MAX_OFFSET = 2**31 - 1  # a row offset any SQL database takes (SQLite and PostgreSQL are int64)
CODE = "invalid_page_token"


def invalid_page_token(token: object, why: str) -> InvalidInput:
    shown = repr(token) if len(repr(token)) <= 48 else repr(token)[:45] + "..."
    return InvalidInput(
        f"page_token {shown} is not one this API issued ({why}); pass the next_page_token of the previous "
        "page unchanged, or omit it to start from the top",
        code=CODE,
        details={"field": "page_token"},
    )


def _json(token: object, altchars: bytes | None) -> Any:
    if not isinstance(token, str):
        raise invalid_page_token(token, "not a string")
    if len(token) > MAX_TOKEN_CHARS:
        raise invalid_page_token(token, f"longer than {MAX_TOKEN_CHARS} characters")
    if not token.isascii():
        raise invalid_page_token(token, "not ASCII")
    try:
        raw = base64.b64decode(token, altchars=altchars, validate=True)
        return json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise invalid_page_token(token, "not base64 of JSON") from None


def encode_page_token(*key: Any) -> str:
    """The token for the page after the row whose sort key is ``key``."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def decode_page_token(token: str | None, *fields: Callable[[Any], Any]) -> tuple[Any, ...] | None:
    """The sort key in a token from ``encode_page_token``, each field through its converter
    (``str_field``, ``int_field``, ``time_field`` or any callable raising ValueError/TypeError on a
    bad value); None when there is no token (the first page)."""
    if token is None or token == "":
        return None
    key = _json(token, b"-_")
    if not isinstance(key, list) or len(key) != len(fields):
        raise invalid_page_token(token, f"not a key of {len(fields)} field(s)")
    try:
        return tuple(convert(value) for convert, value in zip(fields, key))
    except (TypeError, ValueError, OverflowError):
        raise invalid_page_token(token, "a key field has the wrong type") from None


def str_field(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise TypeError("not a string of at most 256 characters")
    return value


def int_field(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**63 - 1:
        raise TypeError("not a non-negative 64-bit integer")
    return value


def time_field(value: Any) -> datetime:
    return datetime.fromisoformat(str_field(value))


def mlflow_page_token(token: str | None) -> str | None:
    """MLflow's token, unchanged, once it is known to hold a row offset MLflow can use."""
    if token is None or token == "":
        return None
    key = _json(token, None)
    offset = key.get("offset") if isinstance(key, dict) else None
    if isinstance(offset, bool) or not isinstance(offset, int) or not 1 <= offset <= MAX_OFFSET:
        raise invalid_page_token(token, "no row offset in it")
    return token

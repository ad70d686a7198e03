"""Credentials out of what the platform shows: the one redaction used by ``/ready``, every
error body, ``/v1/info``, endpoint rows in API answers and the audit log.

:func:`redact` takes a URI or any text holding URIs (an error message that quotes a URL)
and hides the password of each ``scheme://user:password@host`` and the value of query
parameters that carry credentials (``?token=...``, ``X-Amz-Signature=...``). The user name,
host and path stay, so a message still says which server failed.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

MASK = "***"

# scheme://<netloc>[rest]; the netloc ends at the first / ? # or blank, the URI at a blank or quote
_URI = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<netloc>[^\s/?#'\"<>]*)(?P<rest>[^\s'\"<>]*)")
_SECRET_PARAM = re.compile(
    r"(pass(word)?|pwd|secret|token|api[_-]?key|access[_-]?key|signature|sig|credential|auth)", re.IGNORECASE
)


def _netloc(netloc: str) -> str:
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return netloc  # no password (a user name alone is not hidden)
    return f"{userinfo.split(':', 1)[0]}:{MASK}@{host}"


def _rest(rest: str) -> str:
    path, q, query = rest.partition("?")
    if not q:
        return rest
    query, hash_, fragment = query.partition("#")
    parts = []
    for item in query.split("&"):
        name = parse_qsl(item, keep_blank_values=True)[0][0] if "=" in item else item
        parts.append(f"{item.split('=', 1)[0]}={MASK}" if "=" in item and _SECRET_PARAM.search(name) else item)
    return f"{path}?{'&'.join(parts)}{hash_}{fragment}"


def redact(text: str) -> str:
    """``text`` with the credentials in each URI it holds replaced by ``***``."""
    if "://" not in text:
        return text
    return _URI.sub(lambda m: m["scheme"] + _netloc(m["netloc"]) + _rest(m["rest"]), text)


def redact_value(value: Any) -> Any:
    """:func:`redact` applied to every string inside ``value`` (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def keep_redacted(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """An endpoint config sent back as the API showed it keeps the stored credentials: a
    header whose value is ``***`` keeps the stored value, a URI equal to the stored one once
    redacted keeps the stored one. Anything else is taken as sent."""
    out = dict(new)
    if isinstance(new.get("headers"), dict) and isinstance(old.get("headers"), dict):
        out["headers"] = {
            k: old["headers"][k] if v == MASK and k in old["headers"] else v for k, v in new["headers"].items()
        }
    for key, value in new.items():
        if key != "headers" and isinstance(value, str) and isinstance(old.get(key), str):
            if value != old[key] and value == redact(old[key]):
                out[key] = old[key]
    return out

"""Where the platform may read and write on a user's behalf: one resolver for every path or URI
a request names (a registration's source, a job's dataset, checkpoints, batch input and output).

A location is accepted only inside one of the given roots, or in an allowed bucket, and is
refused (``InvalidInput``, HTTP 422, with ``details.field`` naming the request field) before
anything is read or written when it:

- uses a scheme other than a plain path / ``file://`` (local roots) or an object store's
  (``s3://``) whose bucket is allowed or holds one of the roots;
- holds a ``..`` segment, a backslash, a percent sign (so ``%2e%2e%2f`` and double-encoded
  forms never reach a decoder), a query (``?``), a fragment (``#``) or a control character;
- is a ``file://`` URI with a host other than ``localhost``;
- resolves, after following every symlink, outside every local root (``/etc/passwd``, an
  absolute path elsewhere, a symlink inside a root that points out of it).

Relative paths are taken relative to the first local root. The checks are string rules first
and the filesystem's own answer (``realpath``) last, so an encoding trick cannot pass the
string rules and a symlink trick cannot pass the filesystem check.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from app.errors import InvalidInput, NotFound

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_MAX_LEN = 2048
_S3_SCHEMES = ("s3", "s3a")


def refuse(value: str, why: str, fix: str, field: str, code: str) -> InvalidInput:
    return InvalidInput(f"{field} {value!r} is refused: {why}; {fix}", code=code, details={"field": field})


def string_rules(value: str, field: str, fix: str, code: str) -> None:
    """Refuse what no location may hold, before any decoding or filesystem call."""
    if not value:
        raise InvalidInput(f"{field} is empty; {fix}", code=code, details={"field": field})
    if len(value) > _MAX_LEN:
        raise refuse(value[:64] + "...", f"it is longer than {_MAX_LEN} characters", fix, field, code)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise refuse(value, "it holds control characters", fix, field, code)
    if "\\" in value:
        raise refuse(value, "backslashes are not path separators here", "use '/' between path segments", field, code)
    if "%" in value:
        raise refuse(
            value, "percent-encoded characters are not accepted (they could hide '../')",
            "give the plain, decoded path", field, code,
        )
    if "?" in value or "#" in value:
        raise refuse(value, "URL queries and fragments are not part of a storage location",
                     "remove the '?...' or '#...' part", field, code)


def no_dotdot(value: str, path: str, field: str, fix: str, code: str) -> None:
    if any(seg == ".." for seg in path.split("/")):
        raise refuse(value, "'..' segments are not allowed", fix, field, code)


def scheme_of(value: str) -> str:
    match = _SCHEME_RE.match(value)
    return match.group(1).lower() if match else ""


def is_object_store(uri: str) -> bool:
    parts = urlsplit(uri)
    return bool(parts.scheme) and parts.scheme != "file" and bool(parts.netloc)


def local_root(root: str) -> str:
    """A local root as an absolute, symlink-free path (``file://`` accepted)."""
    if root.startswith("file:"):
        root = urlsplit(root).path
    return os.path.realpath(os.path.expanduser(root))


def bucket_name(value: str) -> str:
    """``data`` for ``data``, ``s3://data`` or ``s3://data/prefix``."""
    return urlsplit(value).netloc if "://" in value else value.strip("/")


def resolve_location(
    value: str,
    roots: Sequence[str],
    *,
    field: str,
    buckets: Sequence[str] = (),
    must_exist: bool = False,
    code: str = "unsafe_path",
    where: str | None = None,
) -> str:
    """The canonical location of ``value`` if it lies inside one of ``roots`` or in one of
    ``buckets``: an absolute, symlink-free local path, or ``scheme://bucket/key``.

    ``roots`` are local folders (plain paths or ``file://``) or object-store prefixes
    (``s3://bucket/prefix``); ``buckets`` are whole S3 buckets. ``where`` names the roots in
    messages (default: the list). Raises ``InvalidInput`` (``code``) for anything outside, and
    with ``must_exist`` ``NotFound`` for a local path inside a root that does not exist."""
    where = where or ("the data roots " + ", ".join(roots) if roots else "no data roots (none configured)")
    allowed_buckets = sorted({bucket_name(b) for b in buckets if b})
    fix = f"give a location inside {where}" + (
        f" or in the S3 bucket(s) {', '.join(allowed_buckets)}" if allowed_buckets else ""
    )
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string; {fix}", code=code, details={"field": field})
    string_rules(value, field, fix, code)
    scheme = scheme_of(value)
    object_roots = [urlsplit(r) for r in roots if is_object_store(r)]
    local_roots = [local_root(r) for r in roots if not is_object_store(r)]

    if scheme and scheme != "file":
        parts = urlsplit(value)
        if not parts.netloc:
            raise refuse(value, f"a {scheme}:// URI needs a bucket (or host)", fix, field, code)
        no_dotdot(value, parts.path, field, fix, code)
        key = posixpath.normpath("/" + parts.path.lstrip("/")) if parts.path.strip("/") else "/"
        canonical = f"{scheme}://{parts.netloc}{'' if key == '/' else key}"
        if scheme in _S3_SCHEMES and parts.netloc in allowed_buckets:
            return canonical
        same = [r for r in object_roots if r.scheme.lower() == scheme and r.netloc == parts.netloc]
        for root in same:
            prefix = posixpath.normpath("/" + root.path.strip("/"))
            if prefix == "/" or key == prefix or key.startswith(prefix + "/"):
                return canonical
        if same:
            raise refuse(value, f"it is outside {where}", fix, field, code)
        if any(r.scheme.lower() == scheme for r in object_roots) or (scheme in _S3_SCHEMES and allowed_buckets):
            raise refuse(value, f"bucket {parts.netloc!r} is not allowed", fix, field, code)
        raise refuse(value, f"scheme {scheme + '://'!r} is not allowed here", fix, field, code)

    if scheme == "file":
        parts = urlsplit(value)
        if parts.netloc not in ("", "localhost"):
            raise refuse(value, f"file:// URIs name no host here (got {parts.netloc!r})", fix, field, code)
        path = parts.path
    else:
        path = value
    no_dotdot(value, path, field, fix, code)
    if not local_roots:
        raise refuse(value, "local paths are not allowed here", fix, field, code)
    full = path if os.path.isabs(path) else os.path.join(local_roots[0], path)
    real = os.path.realpath(full)  # follows every symlink, so a link out of a root is caught here
    if not any(os.path.commonpath([root, real]) == root for root in local_roots):
        raise refuse(value, f"it resolves to {real}, outside {where}", fix, field, code)
    if must_exist and not os.path.exists(real):
        raise NotFound(f"{field} {value!r} does not exist under {where}", details={"field": field})
    return real


def check_job_location(value: str, settings, field: str, *, checkpoints: bool = False, must_exist: bool = False) -> str:
    """A job spec's location (``dataset.uri``, ``input_uri``, ...) inside ``settings.storage``'s
    data roots or allowed buckets; checkpoint fields may also name ``jobs.storage_path``, where
    Ray Train keeps them. Returns the canonical location (relative paths made absolute under
    the first data root). Raises ``InvalidInput`` (code ``unsafe_path``) naming ``field``."""
    roots = list(settings.storage.data_roots)
    buckets = list(settings.storage.allowed_buckets)
    if checkpoints:
        train = settings.train_storage_path()
        if train.startswith(("s3://", "s3a://")):
            buckets.append(bucket_name(train))
        else:
            roots.append(train)
    return resolve_location(value, roots, field=field, buckets=buckets, must_exist=must_exist)

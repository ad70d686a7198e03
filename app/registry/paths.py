"""Which artifact locations a registration may read: inside ``settings.artifact_root``, and
nowhere else.

A source is refused (``InvalidInput``, HTTP 422, code ``unsafe_source``) before anything is
read or stored when it:

- uses a scheme other than a plain path / ``file://`` (local roots) or the root's own
  scheme and bucket (object-store roots such as ``s3://``);
- holds a ``..`` segment, a backslash, a percent sign (so ``%2e%2e%2f`` and double-encoded
  forms never reach a decoder), a query (``?``), a fragment (``#``) or a control character;
- is a ``file://`` URI with a host other than ``localhost``;
- resolves, after following every symlink, outside the root (``file:///etc/passwd``, an
  absolute path elsewhere, a symlink inside the root that points out of it).

Relative paths are taken relative to the root. The checks are string rules first and the
filesystem's own answer (``realpath``) last, so an encoding trick cannot pass the string
rules and a symlink trick cannot pass the filesystem check.
"""

from __future__ import annotations

import os
import posixpath
import re
from urllib.parse import urlsplit

from app.errors import InvalidInput, NotFound

UNSAFE = "unsafe_source"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_MAX_LEN = 2048


def _refuse(source: str, why: str, fix: str, field: str = "source") -> InvalidInput:
    return InvalidInput(f"{field} {source!r} is refused: {why}; {fix}", code=UNSAFE, details={"field": field})


def _string_rules(value: str, field: str, fix: str) -> None:
    if not value:
        raise InvalidInput(f"{field} is empty; {fix}", code=UNSAFE, details={"field": field})
    if len(value) > _MAX_LEN:
        raise _refuse(value[:64] + "...", f"it is longer than {_MAX_LEN} characters", fix, field)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise _refuse(value, "it holds control characters", fix, field)
    if "\\" in value:
        raise _refuse(value, "backslashes are not path separators here", "use '/' between path segments", field)
    if "%" in value:
        raise _refuse(
            value, "percent-encoded characters are not accepted (they could hide '../')",
            "give the plain, decoded path", field,
        )
    if "?" in value or "#" in value:
        raise _refuse(value, "URL queries and fragments are not part of an artifact location",
                      "remove the '?...' or '#...' part", field)


def _no_dotdot(value: str, path: str, field: str, fix: str) -> None:
    if any(seg == ".." for seg in path.split("/")):
        raise _refuse(value, "'..' segments are not allowed", fix, field)


def is_object_store(uri: str) -> bool:
    parts = urlsplit(uri)
    return bool(parts.scheme) and parts.scheme != "file" and bool(parts.netloc)


def _local_root(artifact_root: str) -> str:
    root = artifact_root
    if root.startswith("file:"):
        root = urlsplit(root).path
    return os.path.realpath(root)


def resolve_source(source: str, artifact_root: str) -> str:
    """The canonical location of ``source`` if it lies inside ``artifact_root``: an absolute,
    symlink-free local path for local roots, or ``scheme://bucket/key`` for object-store roots.

    Raises ``InvalidInput`` (code ``unsafe_source``) for anything outside the root and
    ``NotFound`` for a local path inside the root that does not exist."""
    fix = f"give a path (or file:// URI) inside the artifact root {artifact_root}"
    if not isinstance(source, str):
        raise InvalidInput(f"source must be a string; {fix}", code=UNSAFE, details={"field": "source"})
    _string_rules(source, "source", fix)
    match = _SCHEME_RE.match(source)
    scheme = match.group(1).lower() if match else ""

    if is_object_store(artifact_root):
        root = urlsplit(artifact_root)
        if scheme != root.scheme.lower():
            raise _refuse(source, f"scheme {scheme or '(none)'!r} is not the artifact root's",
                          f"give a {root.scheme}:// URI inside {artifact_root}")
        parts = urlsplit(source)
        if parts.netloc != root.netloc:
            raise _refuse(source, f"bucket {parts.netloc!r} is not the artifact root's bucket {root.netloc!r}", fix)
        _no_dotdot(source, parts.path, "source", fix)
        key = posixpath.normpath("/" + parts.path.lstrip("/"))
        prefix = posixpath.normpath("/" + root.path.strip("/"))
        if prefix != "/" and key != prefix and not key.startswith(prefix + "/"):
            raise _refuse(source, f"it is outside the artifact root {artifact_root}", fix)
        return f"{root.scheme}://{root.netloc}{key}"

    if scheme == "file":
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise _refuse(source, f"file:// URIs name no host here (got {parts.netloc!r})", fix)
        path = parts.path
    elif scheme:
        raise _refuse(source, f"scheme {scheme + '://'!r} is not allowed for this artifact root", fix)
    else:
        path = source
    _no_dotdot(source, path, "source", fix)
    root = _local_root(artifact_root)
    full = path if os.path.isabs(path) else os.path.join(root, path)
    real = os.path.realpath(full)  # follows every symlink, so a link out of the root is caught here
    if os.path.commonpath([root, real]) != root:
        raise _refuse(source, f"it resolves to {real}, outside the artifact root {root}", fix)
    if not os.path.exists(real):
        raise NotFound(f"source {source!r} does not exist under the artifact root {root}", details={"field": "source"})
    return real


def check_relative_path(value: str, field: str = "artifact_path") -> str:
    """A path inside a run's artifacts (``model``, ``models/onnx``): relative, no ``..``."""
    fix = "give a relative path inside the run's artifacts, like 'model'"
    _string_rules(value, field, fix)
    if _SCHEME_RE.match(value) or value.startswith("/"):
        raise _refuse(value, "it must be relative to the run's artifact root", fix, field)
    _no_dotdot(value, value, field, fix)
    norm = posixpath.normpath(value)
    if norm in (".", ""):
        raise _refuse(value, "it names the run's whole artifact root", fix, field)
    return norm

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

import posixpath

from app.errors import DependencyUnavailable, InvalidInput
from app.storage.paths import is_object_store, no_dotdot, refuse, resolve_location, scheme_of, string_rules

__all__ = ["UNSAFE", "check_relative_path", "is_object_store", "resolve_source"]

UNSAFE = "unsafe_source"


def resolve_source(source: str, artifact_root: str) -> str:
    """The canonical location of ``source`` if it lies inside ``artifact_root``: an absolute,
    symlink-free local path for local roots, or ``scheme://bucket/key`` for object-store roots.

    Raises ``InvalidInput`` (code ``unsafe_source``) for anything outside the root and
    ``NotFound`` for a local path inside the root that does not exist."""
    return resolve_location(
        source, [artifact_root], field="source", must_exist=True, code=UNSAFE,
        where=f"the artifact root {artifact_root}",
    )


def check_relative_path(value: str, field: str = "artifact_path") -> str:
    """A path inside a run's artifacts (``model``, ``models/onnx``): relative, no ``..``."""
    fix = "give a relative path inside the run's artifacts, like 'model'"
    string_rules(value, field, fix, UNSAFE)
    if scheme_of(value) or value.startswith("/"):
        raise refuse(value, "it must be relative to the run's artifact root", fix, field, UNSAFE)
    no_dotdot(value, value, field, fix, UNSAFE)
    norm = posixpath.normpath(value)
    if norm in (".", ""):
        raise refuse(value, "it names the run's whole artifact root", fix, field, UNSAFE)
    return norm


def check_run_source(client, source: str, artifact_root: str) -> str:
    """Where a run's model lies in storage, checked inside ``artifact_root`` before anything
    is downloaded: the run's own artifacts (``source`` is their URI) or, for ``models:/m-...``,
    the logged model's ``artifact_location``. A run of an experiment whose artifact location is
    elsewhere (``/etc``, another bucket) is refused with 422, code ``unsafe_source``."""
    location = source
    if source.startswith("models:/"):
        try:
            location = client.get_logged_model(source[len("models:/"):].strip("/")).artifact_location
        except Exception as exc:  # MLflow down or the model gone since it was listed
            raise DependencyUnavailable(f"could not look up {source} in MLflow: {exc}") from None
    try:
        return resolve_source(location, artifact_root)
    except InvalidInput as exc:
        raise InvalidInput(
            f"the run's model is stored at {location}, outside the artifact root {artifact_root}; only runs of "
            "experiments under the artifact root can be registered from", code=UNSAFE, details={"field": "run_id"},
        ) from exc

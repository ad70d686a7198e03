"""Bearer-token authentication and the four roles.

Roles are ordered: ``viewer`` < ``predictor`` < ``developer`` < ``admin``; a route names the
least role it needs. The admin token comes from ``MATIH_ADMIN_TOKEN`` or, in the local
profile, from a file under ``MATIH_HOME`` created on first start with mode 0600. Further
tokens are issued by an admin through ``POST /v1/tokens`` and stored hashed.
"""

from __future__ import annotations

import enum
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from app.errors import ConfigError, InvalidInput, PermissionDenied, Unauthenticated
from app.settings import Settings
from app.store import MetadataStore


class Role(enum.IntEnum):
    viewer = 1
    predictor = 2
    developer = 3
    admin = 4

    @classmethod
    def parse(cls, value: str) -> "Role":
        try:
            return cls[value]
        except KeyError:
            raise InvalidInput(
                f"role {value!r} is not one of {', '.join(r.name for r in cls)}", details={"field": "role"}
            ) from None


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    def require(self, needed: Role) -> None:
        if self.role < needed:
            raise PermissionDenied(
                f"{self.name} has role {self.role.name}; this needs {needed.name} or higher",
                details={"role": self.role.name, "needed": needed.name},
            )


ANONYMOUS_ADMIN = Principal("anonymous", Role.admin)


def admin_token_path(settings: Settings) -> Path:
    return settings.matih_home / settings.auth.admin_token_file


def ensure_admin_token(settings: Settings) -> tuple[str, Path | None]:
    """Return the admin token and the file it lives in (None when it came from the environment).

    Creates the file with a fresh token (mode 0600, owner only) on first start when the
    profile allows generating one; refuses otherwise.
    """
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value(), None
    path = admin_token_path(settings)
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, path
    if not settings.auth.generate_admin_token:
        raise ConfigError(
            f"no admin token: the {settings.profile} profile needs MATIH_ADMIN_TOKEN to be set"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "mtk_admin_" + secrets.token_urlsafe(32)
    # O_EXCL: two processes starting at once must not both write; the loser reads the winner's.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip(), path
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    return token, path


def read_admin_token(settings: Settings) -> str | None:
    """The admin token as the CLI finds it: environment first, then the local token file."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = admin_token_path(settings)
    return path.read_text().strip() if path.exists() else None


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Principal`, caching store lookups."""

    def __init__(self, settings: Settings, store: MetadataStore, admin_token: str | None):
        self._enabled = settings.auth.enabled
        self._ttl = settings.auth.cache_ttl_s
        self._store = store
        self._admin_token = admin_token
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        if not self._enabled:
            return ANONYMOUS_ADMIN
        if not authorization:
            raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
        if self._admin_token is not None and hmac.compare_digest(token, self._admin_token):
            return Principal("admin", Role.admin)
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            principal = hit[1]
        else:
            found = self._store.role_for_token(token)
            principal = Principal(found[1], Role[found[0]]) if found else None
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[token] = (now + self._ttl, principal)
        if principal is None:
            raise Unauthenticated("unknown or revoked token")
        return principal

"""Bearer-token authentication and the four roles.

Roles are ordered: ``viewer`` < ``predictor`` < ``developer`` < ``admin``; a route names the
least role it needs. The admin token comes from ``MATIH_ADMIN_TOKEN`` or, in the local
profile, from a file under ``MATIH_HOME`` created on first start with mode 0600. Further
tokens are issued by an admin through ``POST /v1/tokens`` and stored hashed.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cachetools import TTLCache

from app.errors import ConfigError, InvalidInput, PermissionDenied, Unauthenticated
from app.settings import Settings
from app.store import MetadataStore, hash_token


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


_MAX_TOKEN_CHARS = 512  # far above any token this platform issues; longer ones are refused unread


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Principal`, caching store lookups.

    Valid tokens are cached (keyed by their SHA-256, never the plaintext) for
    ``auth.cache_ttl_s`` in an LRU of ``auth.cache_size`` entries, and never past their
    ``expires_at``. Unknown tokens go to a separate, smaller cache, so a flood of random
    tokens evicts only other unknown ones, never a valid token. The store lookup runs in a
    worker thread: the event loop never waits on the database.
    """

    def __init__(self, settings: Settings, store: MetadataStore, admin_token: str | None):
        self._enabled = settings.auth.enabled
        self._store = store
        self._admin_token = admin_token.encode("utf-8", "surrogatepass") if admin_token is not None else None
        ttl = settings.auth.cache_ttl_s
        size = settings.auth.cache_size
        # digest -> (principal, expiry as a Unix time or None)
        self._known: TTLCache[str, tuple[Principal, float | None]] = TTLCache(maxsize=size, ttl=ttl)
        self._unknown: TTLCache[str, bool] = TTLCache(maxsize=max(1, size // 10), ttl=ttl)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self._enabled:
            return ANONYMOUS_ADMIN
        token = self._bearer(authorization)
        raw = token.encode("utf-8", "surrogatepass")
        # As bytes: hmac.compare_digest refuses str with non-ASCII characters (TypeError).
        if self._admin_token is not None and hmac.compare_digest(raw, self._admin_token):
            return Principal("admin", Role.admin)
        if not token.isascii() or len(token) > _MAX_TOKEN_CHARS:  # never one we issued
            raise Unauthenticated("unknown or revoked token")
        digest = hash_token(token)
        hit = self._known.get(digest)
        if hit is not None:
            principal, expires_at = hit
            if expires_at is None or expires_at > time.time():
                return principal
            self._known.pop(digest, None)
            raise Unauthenticated("the token has expired")
        if digest in self._unknown:
            raise Unauthenticated("unknown or revoked token")
        found = await asyncio.to_thread(self._store.role_for_token, token)
        if found is None:
            self._unknown[digest] = True
            raise Unauthenticated("unknown, revoked or expired token")
        role, name, expires_at = found
        principal = Principal(name, Role[role])
        self._known[digest] = (principal, expires_at)
        return principal

    @staticmethod
    def _bearer(authorization: str | None) -> str:
        if not authorization:
            raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
        return token

import asyncio
import os
import secrets
import stat
import time
from datetime import datetime, timedelta, timezone

import pytest

from app.auth import Authenticator, Role, ensure_admin_token, read_admin_token
from app.errors import ConfigError, PermissionDenied, Unauthenticated
from app.settings import load_settings


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.delenv("MATIH_ADMIN_TOKEN", raising=False)
    return load_settings("local", matih_home=str(tmp_path))


def test_first_start_writes_an_owner_only_token_file_and_reuses_it(settings):
    token, path = ensure_admin_token(settings)
    assert path == settings.matih_home / "admin_token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, _ = ensure_admin_token(settings)
    assert again == token and read_admin_token(settings) == token


def test_environment_token_wins_and_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MATIH_ADMIN_TOKEN", "from-env")
    s = load_settings("local", matih_home=str(tmp_path))
    assert ensure_admin_token(s) == ("from-env", None)
    assert not (tmp_path / "admin_token").exists()


def test_no_token_and_no_generation_refuses(tmp_path, monkeypatch):
    monkeypatch.delenv("MATIH_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError):
        load_settings("local", matih_home=str(tmp_path), auth={"generate_admin_token": False})


def test_roles_are_ordered():
    assert Role.viewer < Role.predictor < Role.developer < Role.admin


def _auth(settings, store, admin_token=None, **auth):
    return Authenticator(settings.model_copy(update={"auth": settings.auth.model_copy(update=auth)}), store, admin_token)


def test_authenticator_admin_issued_and_revoked_tokens(settings, store):
    admin_token, _ = ensure_admin_token(settings)
    auth = _auth(settings, store, admin_token, cache_ttl_s=0)
    assert asyncio.run(auth.authenticate(f"Bearer {admin_token}")).role is Role.admin
    record, plaintext = store.create_token("ci-bot", "predictor", "admin")
    who = asyncio.run(auth.authenticate(f"Bearer {plaintext}"))
    assert (who.name, who.role) == ("ci-bot", Role.predictor)
    who.require(Role.viewer)
    with pytest.raises(PermissionDenied, match="needs developer"):
        who.require(Role.developer)
    store.revoke_token(record["id"], "admin")
    with pytest.raises(Unauthenticated):
        asyncio.run(auth.authenticate(f"Bearer {plaintext}"))
    for header in (None, "", "Basic abc", "Bearer ", "Bearer nope"):
        with pytest.raises(Unauthenticated):
            asyncio.run(auth.authenticate(header))


def test_non_ascii_tokens_are_refused_not_a_type_error(settings, store):
    """hmac.compare_digest on str raises TypeError for non-ASCII text (a 500 before); as bytes, a 401."""
    auth = _auth(settings, store, "mtk_admin_secret")
    for token in ("tökén", "²", "mtk_admin_secreté", "\udcff", "x" * 5000):
        with pytest.raises(Unauthenticated):
            asyncio.run(auth.authenticate(f"Bearer {token}"))
    auth = _auth(settings, store, "admïn-tökén")  # an odd admin token still compares
    assert asyncio.run(auth.authenticate("Bearer admïn-tökén")).role is Role.admin


def test_expired_tokens_are_refused_even_from_the_cache(settings, store):
    auth = _auth(settings, store, cache_ttl_s=60)
    _, old = store.create_token("old", "viewer", "admin", expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    with pytest.raises(Unauthenticated, match="expired"):
        asyncio.run(auth.authenticate(f"Bearer {old}"))
    record, soon = store.create_token("soon", "viewer", "admin", expires_at=datetime.now(timezone.utc) + timedelta(seconds=0.5))
    assert record["expires_at"] is not None
    assert asyncio.run(auth.authenticate(f"Bearer {soon}")).name == "soon"  # now cached for 60 s
    time.sleep(0.6)
    with pytest.raises(Unauthenticated, match="expired"):
        asyncio.run(auth.authenticate(f"Bearer {soon}"))


def test_a_flood_of_random_tokens_cannot_evict_a_valid_one(settings, store):
    auth = _auth(settings, store, cache_ttl_s=600, cache_size=50)
    record, good = store.create_token("good", "viewer", "admin")

    async def flood() -> int:
        assert (await auth.authenticate(f"Bearer {good}")).name == "good"
        store.revoke_token(record["id"], "admin")  # from now on only the cache knows the token
        refused = 0
        for _ in range(600):  # 12x the cache size
            try:
                await auth.authenticate(f"Bearer mtk_{secrets.token_urlsafe(32)}")
            except Unauthenticated:
                refused += 1
        assert (await auth.authenticate(f"Bearer {good}")).name == "good"  # still cached
        return refused

    assert asyncio.run(flood()) == 600


@pytest.mark.postgres
def test_the_token_lookup_never_blocks_the_event_loop(settings, tmp_path):
    """While the token table is locked (a slow database), the event loop keeps running."""
    from sqlalchemy import text

    from tests.conftest import POSTGRES_URL, _postgres_admin_engine
    from app.store import MetadataStore

    admin = _postgres_admin_engine()
    name = f"matih_auth_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no PostgreSQL here
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}: {exc}")
    url = load_settings(database_url=f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}", matih_home=str(tmp_path)).database_url
    store = MetadataStore(url)
    try:
        store.migrate()
        _, token = store.create_token("slow", "viewer", "admin")
        auth = _auth(settings, store)

        async def run() -> tuple[int, str]:
            ticks = 0
            stop = asyncio.Event()

            async def ticker():
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0.01)

            t = asyncio.create_task(ticker())
            with store.engine.connect() as locker:
                tx = locker.begin()
                locker.execute(text("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE"))
                lookup = asyncio.create_task(auth.authenticate(f"Bearer {token}"))
                await asyncio.sleep(0.5)
                assert not lookup.done()  # waiting on the lock ...
                tx.rollback()
            who = await lookup
            stop.set()
            await t
            return ticks, who.name

        ticks, who = asyncio.run(run())
        assert who == "slow" and ticks >= 20  # ... while the loop ran on
    finally:
        store.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


class _NoJobs:
    async def notify(self) -> None:
        pass

    async def cancel(self, job_id: str, actor: str):
        raise AssertionError("not used")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from fastapi.testclient import TestClient

    from app.api.app import create_app
    from app.bootstrap import prepare
    from tests.support import in_process_context

    home = tmp_path_factory.mktemp("auth_home")
    settings = load_settings("local", matih_home=str(home), mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, _NoJobs())
    client = TestClient(create_app(ctx))
    client.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    yield client
    ctx.store.dispose()


def test_post_tokens_with_ttl_or_expires_at(api):
    r = api.post("/v1/tokens", json={"name": "short", "role": "viewer", "ttl_s": 600})
    assert r.status_code == 201, r.text
    body = r.json()
    left = datetime.fromisoformat(body["expires_at"]) - datetime.now(timezone.utc)
    assert timedelta(seconds=590) < left <= timedelta(seconds=600)
    assert api.get("/v1/info", headers={"Authorization": f"Bearer {body['token']}"}).status_code == 200
    at = (datetime.now(timezone.utc) + timedelta(days=1)).replace(microsecond=0)
    r = api.post("/v1/tokens", json={"name": "day", "role": "viewer", "expires_at": at.isoformat()})
    assert r.status_code == 201 and datetime.fromisoformat(r.json()["expires_at"]) == at
    r = api.post("/v1/tokens", json={"name": "forever", "role": "viewer"})
    assert r.status_code == 201 and r.json()["expires_at"] is None


@pytest.mark.parametrize("body, field", [
    ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"expires_at": "0001-01-01T00:00:00+01:00"}, "expires_at"),
    ({"expires_at": "9999-12-31T23:59:59-14:00"}, "expires_at"),
    ({"ttl_s": 0}, "ttl_s"),
    ({"ttl_s": 1e300}, "ttl_s"),
    ({"ttl_s": 60, "expires_at": "2999-01-01T00:00:00Z"}, "body"),
])
def test_post_tokens_refuses_a_bad_expiry_with_422(api, body, field):
    r = api.post("/v1/tokens", json={"name": "bad", "role": "viewer", **body})
    assert r.status_code == 422, r.text
    assert r.json()["details"]["field"] == field


def test_an_expired_or_non_ascii_token_gets_401_over_http(api):
    store = api.app.state.ctx.store
    _, old = store.create_token("old", "viewer", "admin", expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    for header in (f"Bearer {old}".encode(), "Bearer tökén".encode(), "Bearer tökén".encode("latin-1")):
        r = api.get("/v1/info", headers={"Authorization": header})
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated", r.text

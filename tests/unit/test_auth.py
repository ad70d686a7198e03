import os
import stat

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


def test_authenticator_admin_issued_and_revoked_tokens(settings, store):
    admin_token, _ = ensure_admin_token(settings)
    auth = Authenticator(settings.model_copy(update={"auth": settings.auth.model_copy(update={"cache_ttl_s": 0})}),
                         store, admin_token)
    assert auth.authenticate(f"Bearer {admin_token}").role is Role.admin
    record, plaintext = store.create_token("ci-bot", "predictor", "admin")
    who = auth.authenticate(f"Bearer {plaintext}")
    assert (who.name, who.role) == ("ci-bot", Role.predictor)
    who.require(Role.viewer)
    with pytest.raises(PermissionDenied, match="needs developer"):
        who.require(Role.developer)
    store.revoke_token(record["id"], "admin")
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"Bearer {plaintext}")
    for header in (None, "", "Basic abc", "Bearer ", "Bearer nope"):
        with pytest.raises(Unauthenticated):
            auth.authenticate(header)

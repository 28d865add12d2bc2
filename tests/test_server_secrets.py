"""Secrets stay secret: the API key is never echoed by the info routes, the start-up log or `ps`,
and `nl serve` takes it from NL_API_KEY or --api-key-file as well as --api-key."""

import os

import httpx
import pytest

from nlcli.engine.args import ServerArgs
from tests.test_scheduler_fakes import LiveServer

KEY = "sk-never-echo-91c2d7"
INFO_ROUTES = ("/get_server_args", "/get_server_info", "/server_info")


class _KeyedServer(LiveServer):
    api_key = KEY


def test_repr_and_public_dict_mask_every_secret_field():
    args = ServerArgs(api_key=KEY, admin_api_key=KEY + "-admin")
    secret = [f for f in ServerArgs.__dataclass_fields__.values() if f.metadata.get("secret")]
    assert {f.name for f in secret} >= {"api_key", "admin_api_key"}
    assert KEY not in repr(args)
    public = args.public_dict()
    assert KEY not in str(public)
    assert public["api_key"] == "***" and public["admin_api_key"] == "***"
    assert ServerArgs().public_dict()["api_key"] is None  # unset stays visibly unset
    assert public["port"] == args.port  # everything else as it was


def test_secrets_come_from_file_or_env_and_conflicts_are_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    assert ServerArgs(api_key_file=str(path)).with_secrets({}).api_key == KEY
    assert ServerArgs().with_secrets({"NL_API_KEY": KEY}).api_key == KEY
    assert ServerArgs().with_secrets({"NL_ADMIN_API_KEY": KEY}).admin_api_key == KEY
    # The flag wins over the environment; flag and file together are a mistake.
    assert ServerArgs(api_key="flag").with_secrets({"NL_API_KEY": KEY}).api_key == "flag"
    with pytest.raises(ValueError, match="not both"):
        ServerArgs(api_key="flag", api_key_file=str(path)).with_secrets({})
    with pytest.raises(ValueError, match="api-key-file") as e:
        ServerArgs(api_key_file=str(tmp_path / "missing")).with_secrets({})
    assert KEY not in str(e.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ServerArgs(api_key_file=str(tmp_path / "empty")).with_secrets({})


def _check_never_echoed(srv: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for route in INFO_ROUTES:
        r = httpx.get(srv.url + route, headers=auth, timeout=30)
        assert r.status_code == 200, route
        assert KEY not in r.text, route
        assert r.json()["api_key"] == "***", route
    assert httpx.get(srv.url + "/get_server_args", timeout=30).status_code == 401
    wrong = httpx.get(srv.url + "/get_server_args", timeout=30,
                      headers={"Authorization": "Bearer " + KEY[:-1]})
    assert wrong.status_code == 401
    gen = httpx.post(srv.url + "/generate", headers={"x-api-key": KEY}, timeout=60,
                     json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    assert gen.status_code == 200
    for pid in [srv.proc.pid, *srv.engine_pids()]:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert KEY.encode() not in f.read()
    assert srv.stop() == 0
    log = srv.log()
    assert "server_args=ServerArgs(" in log and "api_key='***'" in log
    assert KEY not in log


@pytest.mark.slow
def test_key_from_environment_is_required_and_never_echoed(tmp_path):
    srv = _KeyedServer(str(tmp_path), env={"NL_API_KEY": KEY})
    try:
        _check_never_echoed(srv)
    finally:
        srv.stop()


@pytest.mark.slow
def test_key_from_file_is_required_and_never_echoed(tmp_path):
    path = tmp_path / "api-key"
    path.write_text(KEY + "\n")
    env = {k: "" for k in ("NL_API_KEY",) if k in os.environ}
    srv = _KeyedServer(str(tmp_path), ["--api-key-file", str(path)], env=env)
    try:
        _check_never_echoed(srv)
    finally:
        srv.stop()

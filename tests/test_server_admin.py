"""--admin-api-key: the routes that change the server for everyone (weight updates, flush, abort,
pause/continue) take only the admin key; every other route takes either key."""

import httpx

from nlcli.engine.api.middleware import ADMIN_ROUTES, is_admin_route
from tests.app_server import AppServer

USER, ADMIN = "sk-user-5be1", "sk-admin-0c77"
# Each admin route with a body it accepts (the routes another change adds may still 404 here).
ADMIN_CALLS = [("/flush_cache", None), ("/abort_request", {"rid": "nobody"}),
               ("/update_weights_from_disk", {"model_path": "/nonexistent"}),
               ("/update_weights", {"model_path": "/nonexistent"}),
               ("/pause_generation", {}), ("/continue_generation", {})]
GEN = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}


def _bearer(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_admin_routes_are_the_documented_list():
    assert all(is_admin_route(p) for p, _ in ADMIN_CALLS)
    for path in ("/update_weights_from_tensor", "/flush_cache/", "/pause_generation"):
        assert is_admin_route(path)
    for path in ("/generate", "/v1/chat/completions", "/get_server_info", "/health_generate"):
        assert not is_admin_route(path)
    assert "/pause_generation" in ADMIN_ROUTES and "/continue_generation" in ADMIN_ROUTES


def test_admin_key_alone_opens_admin_routes_either_key_opens_the_rest():
    with AppServer(api_key=USER, admin_api_key=ADMIN) as srv, httpx.Client(timeout=60) as c:
        for path, body in ADMIN_CALLS:
            for key in (None, USER, "wrong"):
                r = c.post(srv.url + path, json=body, headers=_bearer(key))
                assert r.status_code == 401, (path, key, r.text)
                assert r.json() == {"error": "Unauthorized"}
            r = c.post(srv.url + path, json=body, headers=_bearer(ADMIN))
            assert r.status_code != 401, (path, r.text)
        assert c.post(srv.url + "/flush_cache", headers={"x-api-key": ADMIN}).status_code == 200
        for key in (USER, ADMIN):
            assert c.post(srv.url + "/generate", json=GEN, headers=_bearer(key)).status_code == 200
            assert c.get(srv.url + "/get_server_info", headers=_bearer(key)).status_code == 200
        assert c.post(srv.url + "/generate", json=GEN).status_code == 401
        info = c.get(srv.url + "/get_server_args", headers=_bearer(USER)).json()
        assert info["admin_api_key"] == "***" and ADMIN not in str(info)


def test_admin_key_without_user_key_guards_only_admin_routes():
    with AppServer(admin_api_key=ADMIN) as srv, httpx.Client(timeout=60) as c:
        assert c.post(srv.url + "/generate", json=GEN).status_code == 200
        assert c.post(srv.url + "/flush_cache").status_code == 401
        assert c.post(srv.url + "/flush_cache", headers=_bearer(ADMIN)).status_code == 200


def test_without_admin_key_the_user_key_opens_admin_routes():
    with AppServer(api_key=USER) as srv, httpx.Client(timeout=60) as c:
        assert c.post(srv.url + "/flush_cache").status_code == 401
        assert c.post(srv.url + "/flush_cache", headers=_bearer(USER)).status_code == 200

"""NlClient against canned HTTP answers (httpx.MockTransport): envelopes, SSE, typed errors."""

from __future__ import annotations

import httpx
import pytest

from nlcli.client import NlClient, ServerError, Unauthorized, Unreachable, iter_sse


def client_for(handler) -> NlClient:
    return NlClient("http://nl.test", api_key="k", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "status,body,message",
    [
        (400, {"error": {"message": "top_p must be in (0, 1], got 2.0."}},
         "top_p must be in (0, 1], got 2.0."),
        (400, {"object": "error", "message": "bad", "type": "BadRequestError", "param": None,
               "code": 400}, "bad"),
        (400, {"success": False, "message": "Failed to get weights iterator: x."},
         "Failed to get weights iterator: x."),
        (404, {"detail": "Not Found"}, "Not Found"),
        (422, {"detail": [{"loc": ["body", "text"], "msg": "bad type"}]}, "body.text: bad type"),
        (500, None, "Internal Server Error"),
    ],
)
def test_error_envelopes(status, body, message):
    def handler(request):
        if body is None:
            return httpx.Response(status, text="Internal Server Error")
        return httpx.Response(status, json=body)

    with client_for(handler) as c, pytest.raises(ServerError) as e:
        c.generate({"text": "x"})
    assert e.value.message == message and e.value.status == status and e.value.exit_code == 1


def test_401_is_unauthorized_and_key_is_sent():
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(401, json={"error": "Unauthorized"})

    with client_for(handler) as c, pytest.raises(Unauthorized) as e:
        c.model_info()
    assert seen == ["Bearer k"] and e.value.exit_code == 5 and "k" not in e.value.message.split()


def test_connect_failure_is_unreachable():
    def handler(request):
        raise httpx.ConnectError("refused", request=request)

    with client_for(handler) as c, pytest.raises(Unreachable) as e:
        c.health()
    assert e.value.exit_code == 3 and e.value.status is None


def test_sse_events_comments_and_multiline_data():
    lines = [": keep-alive", "data: {\"a\":", "data: 1}", "", "data:[DONE]", ""]
    assert list(iter_sse(iter(lines))) == ['{"a":\n1}', "[DONE]"]


def test_stream_yields_events_then_raises_on_error_event():
    body = (b'data: {"text": "Hi", "meta_info": {}}\n\n'
            b'data: {"error": {"message": "engine died"}}\n\ndata: [DONE]\n\n')

    def handler(request):
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with client_for(handler) as c:
        events = c.generate_stream({"text": "x"})
        assert next(events)["text"] == "Hi"
        with pytest.raises(ServerError, match="engine died"):
            next(events)


def test_route_fallback_to_older_names():
    def handler(request):
        if request.url.path == "/get_server_args":
            return httpx.Response(200, json={"port": 1})
        return httpx.Response(404, json={"detail": "Not Found"})

    with client_for(handler) as c:
        assert c.server_info() == {"port": 1}
        assert c.memory_pool_size() is None

"""Hostile and broken requests through the ASGI app: each gets a 4xx in OpenAI's error
shape (never a 5xx or a traceback), reaches no upstream, and leaks no upstream key."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from router.app import Settings, create_app
from router.routing.auth import key_digest
from tests.unit.helpers import BASE_YAML, World, config, gateway_app, lifespan_client

SECRET = "sk-test-secret"
LIMIT = 4 * 1024 * 1024  # server.max_body_bytes by default
USER = [{"role": "user", "content": "hello"}]
CHAT = {"model": "demo", "messages": USER}
# The demo engine serving embeddings too.
YAML = BASE_YAML.replace("port: 8101",
                         "port: 8101\n        endpoints: [chat, completions, embeddings]")


@pytest.fixture
async def client(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with lifespan_client(gateway_app(world, config(YAML), {"MISTRAL_API_KEY": SECRET})
                               ) as c:
        yield c


def refused(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response is OpenAI's error JSON with `status`, and gives nothing away."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param
    assert err["type"] == ("authentication_error" if status == 401 else "invalid_request_error")
    assert "Traceback" not in r.text and SECRET not in r.text
    assert all(SECRET not in v for v in r.headers.values())
    return err


async def post(client: httpx.AsyncClient, body: bytes, path: str = "/v1/chat/completions",
               **headers: str) -> httpx.Response:
    return await client.post(path, content=body,
                             headers={"content-type": "application/json", **headers})


def chat(**fields: Any) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


# --- size -----------------------------------------------------------------------------

async def test_declared_length_over_the_limit_is_413_unread(client: httpx.AsyncClient,
                                                            world: World) -> None:
    r = await post(client, chat(), **{"content-length": str(LIMIT + 1)})
    err = refused(r, 413)
    assert err["code"] == "payload_too_large"
    assert world.seen == []


async def test_chunked_body_over_the_limit_is_413_and_not_read_to_the_end(
        client: httpx.AsyncClient, world: World) -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"model": "demo", "messages": [{"role": "user", "content": "'
        for _ in range(10 * LIMIT // 65536):
            sent += 1
            yield b"x" * 65536
        yield b'"}]}'

    r = await client.post("/v1/chat/completions", content=body(),
                          headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    refused(r, 413)
    assert sent <= LIMIT // 65536 + 1  # it stopped reading at the limit
    assert world.seen == []


async def test_client_hanging_up_mid_body_is_a_400_not_an_error(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(env={"MISTRAL_API_KEY": SECRET}), config=config(),
                     transport=world.transport())
    incoming = [{"type": "http.request", "body": b'{"model": "de', "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("router", 80), "state": {}}
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["code"] == "client_disconnected"
    assert "unhandled" not in caplog.text
    assert world.seen == []


@pytest.mark.parametrize("declared", ["ten", "-", "1e3", "9" * 5000])
async def test_content_length_that_is_not_a_number_is_400(client: httpx.AsyncClient,
                                                          declared: str) -> None:
    refused(await post(client, chat(), **{"content-length": declared}), 400)


# --- what is not JSON, or not a JSON object --------------------------------------------

async def test_100k_levels_of_nesting_is_a_quick_400(client: httpx.AsyncClient) -> None:
    t0 = time.monotonic()
    r = await post(client, b"[" * 100_000 + b"]" * 100_000)
    refused(r, 400)
    r = await post(client, b'{"model": "demo", "x": ' + b'{"a": ' * 100_000 + b"1"
                   + b"}" * 100_001)
    refused(r, 400)
    assert time.monotonic() - t0 < 5  # milliseconds, really; no recursion anywhere


@pytest.mark.parametrize("field", ["tools", "response_format", "vllm_xargs"])
@pytest.mark.parametrize("depth", [300, 1000])
async def test_nesting_deeper_than_can_be_sent_on_is_400(
        client: httpx.AsyncClient, world: World, field: str, depth: int) -> None:
    # orjson reads 1024 levels but writes 254: once a 500 from the dispatcher.
    nested = b"[" * depth + b"]" * depth
    r = await post(client, chat()[:-1] + b', "' + field.encode() + b'": ' + nested + b"}")
    err = refused(r, 400)
    assert "nested too deeply" in err["message"]
    assert world.seen == []


async def test_reasonable_nesting_passes_through(client: httpx.AsyncClient,
                                                 world: World) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(60):
        schema = {"type": "object", "properties": {"x": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    r = await post(client, chat(tools=tools))
    assert r.status_code == 200, r.text
    assert world.bodies("local")[0]["tools"] == tools


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "demo", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "demo", "messages": [{"role": "user", "content": "\xc0\xaf"}]}',  # overlong
        b'{"model": "demo", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b"\xef\xbb\xbf" + json.dumps(CHAT).encode(),  # a byte order mark
        "{\"model\": \"démo\"}".encode("latin-1"),
    ],
    ids=["ff-fe", "overlong", "surrogate", "escaped-lone-surrogate", "bom", "latin-1"],
)
async def test_invalid_utf8_is_400(client: httpx.AsyncClient, world: World,
                                   body: bytes) -> None:
    err = refused(await post(client, body), 400)
    assert "not valid JSON" in err["message"]
    assert world.seen == []


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
async def test_nan_and_infinity_are_400(client: httpx.AsyncClient, literal: bytes) -> None:
    refused(await post(client, chat()[:-1] + b', "temperature": ' + literal + b"}"), 400)


@pytest.mark.parametrize("body", [b"", b"   \n", b"null", b"[]", b'"chat"', b"42", b"true",
                                  b"{", b'{"model": "demo",}', b"{'model': 'demo'}"])
async def test_empty_or_not_an_object_is_400(client: httpx.AsyncClient, world: World,
                                             body: bytes) -> None:
    refused(await post(client, body), 400)
    refused(await post(client, body, "/v1/route/explain"), 400)
    assert world.seen == []


# --- content types ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
     "multipart/form-data; boundary=x", "application/xml", "application/jsonx",
     "text/json"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings",
                                  "/v1/route/explain"])
async def test_a_body_not_sent_as_json_is_415(client: httpx.AsyncClient, world: World,
                                              content_type: str, path: str) -> None:
    r = await client.post(path, content=chat(), headers={"content-type": content_type})
    err = refused(r, 415)
    assert err["code"] == "unsupported_media_type"
    assert "application/json" in err["message"]
    assert world.seen == []


async def test_form_data_is_415(client: httpx.AsyncClient) -> None:
    refused(await client.post("/v1/chat/completions", data={"model": "demo"}), 415)
    refused(await client.post("/v1/chat/completions", files={"f": b"{}"}), 415)


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8",
                                          "Application/JSON", "application/merge-patch+json"])
async def test_json_without_or_with_any_json_type_is_served(
        client: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    r = await client.post("/v1/chat/completions", content=chat(), headers=headers)
    assert r.status_code == 200, r.text


# --- numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "n"])
@pytest.mark.parametrize("value", [0, -1, 1.5, 10**30, 2**63, 2**64, -(2**63), "16", True,
                                   [16], {"n": 1}])
async def test_counts_must_be_positive_64_bit_integers(client: httpx.AsyncClient,
                                                       world: World, field: str,
                                                       value: Any) -> None:
    err = refused(await post(client, chat(**{field: value})), 400, field)
    assert "integer" in err["message"]
    assert world.seen == []


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 1e19, 0.5, "7", False])
async def test_seed_must_be_a_64_bit_integer(client: httpx.AsyncClient, value: Any) -> None:
    refused(await post(client, chat(seed=value)), 400, "seed")


async def test_whole_numbers_written_as_floats_are_integers(client: httpx.AsyncClient,
                                                            world: World) -> None:
    r = await post(client, b'{"model": "demo", "max_tokens": 16.0, "n": 1e0, "seed": -7.0,'
                   b' "messages": [{"role": "user", "content": "x"}]}')
    assert r.status_code == 200, r.text
    sent = world.bodies("local")[0]
    assert (sent["max_tokens"], sent["n"], sent["seed"]) == (16, 1, -7)
    assert all(type(sent[k]) is int for k in ("max_tokens", "n", "seed"))


async def test_largest_max_tokens_is_served_by_whoever_fits(client: httpx.AsyncClient,
                                                            world: World) -> None:
    r = await post(client, chat(max_tokens=2**63 - 1, seed=-(2**63)))
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-route"] == "hosted"
    assert r.headers["x-spillover-reason"] == "context-length"
    sent = world.bodies("hosted")[0]
    assert (sent["max_tokens"], sent["random_seed"]) == (2**63 - 1, -(2**63))


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty",
                                   "frequency_penalty"])
@pytest.mark.parametrize("value", ["hot", True, [1], {"v": 1}])
async def test_sampling_numbers_must_be_numbers(client: httpx.AsyncClient, field: str,
                                                value: Any) -> None:
    refused(await post(client, chat(**{field: value})), 400, field)


@pytest.mark.parametrize("value", ["yes", 1, [True], {"include_usage": "yes"},
                                   {"include_usage": 1}])
async def test_stream_options_must_be_an_object_with_a_boolean(client: httpx.AsyncClient,
                                                               world: World,
                                                               value: Any) -> None:
    # Once silently replaced by {"include_usage": true} on the way to the engine.
    refused(await post(client, chat(stream=True, stream_options=value)), 400,
            "stream_options")
    assert world.seen == []


@pytest.mark.parametrize("value", ["true", 1, 0, [], {}])
async def test_stream_must_be_a_boolean(client: httpx.AsyncClient, value: Any) -> None:
    refused(await post(client, chat(stream=value)), 400, "stream")


# --- model and messages ----------------------------------------------------------------

@pytest.mark.parametrize("model", [5, 1.5, True, [], ["demo"], {"name": "demo"}, "", None])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/route/explain"])
async def test_model_of_the_wrong_type_is_400(client: httpx.AsyncClient, world: World,
                                              model: Any, path: str) -> None:
    err = refused(await post(client, chat(model=model), path), 400, "model")
    assert err["code"] == ("missing_required_parameter" if model is None else None)
    assert world.seen == []


async def test_unknown_model_is_404_without_probing_upstreams(client: httpx.AsyncClient,
                                                              world: World) -> None:
    err = refused(await post(client, chat(model="gpt-4" + "x" * 200)), 404, "model")
    assert err["code"] == "model_not_found"
    assert world.seen == []


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": {}, "content": "x"}], "messages[0].role"),  # once a 500: unhashable
        ([{"role": ["user"], "content": "x"}], "messages[0].role"),
        ([{"role": 5, "content": "x"}], "messages[0].role"),
        ([{"role": None, "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "USER", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": {"text": "x"}}], "messages[0].content"),
        ([{"role": "user", "content": True}], "messages[0].content"),
        ([*USER, "hello"], "messages[1]"),
        ([*USER, None], "messages[1]"),
        ([[{"role": "user", "content": "x"}]], "messages[0]"),
        ([], "messages"),
        ({"role": "user", "content": "x"}, "messages"),
        ("hello", "messages"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/route/explain"])
async def test_bad_messages_are_400(client: httpx.AsyncClient, world: World,
                                    messages: Any, param: str, path: str) -> None:
    refused(await post(client, chat(messages=messages), path), 400, param)
    assert world.seen == []


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/embeddings", "input", None),
        ("/v1/embeddings", "input", []),
        ("/v1/embeddings", "input", {"text": "x"}),
        ("/v1/embeddings", "input", [True]),
        ("/v1/embeddings", "input", [{"text": "x"}]),
        ("/v1/completions", "prompt", None),
        ("/v1/completions", "prompt", 5),
        ("/v1/completions", "prompt", [None]),
        ("/v1/completions", "suffix", 5),
    ],
)
async def test_bad_prompt_or_input_is_400(client: httpx.AsyncClient, world: World,
                                          path: str, field: str, value: Any) -> None:
    body: dict[str, Any] = {"model": "demo", "prompt": "x", "input": "x", field: value}
    refused(await post(client, json.dumps(body).encode(), path), 400, field)
    assert world.seen == []


# --- unknown and duplicate fields --------------------------------------------------------

async def test_unknown_fields_reach_vllm_untouched(client: httpx.AsyncClient,
                                                   world: World) -> None:
    extra = {"top_k": 5, "min_p": 0.1, "guided_json": {"type": "object", "properties": {}},
             "chat_template_kwargs": {"enable_thinking": False}, "x_custom": [1, {"a": None}],
             "ünïcode": "✓"}
    r = await post(client, chat(**extra))
    assert r.status_code == 200, r.text
    sent = world.bodies("local")[0]
    assert {k: sent[k] for k in extra} == extra
    assert sent["messages"] == USER


async def test_sampling_fields_on_embeddings_are_unknown_ones(client: httpx.AsyncClient,
                                                              world: World) -> None:
    extra = {"n": "junk", "max_tokens": -1, "seed": 0.5, "temperature": "hot",
             "stream_options": 1, "dimensions": 256}
    r = await post(client, json.dumps({"model": "demo", "input": ["a", "b"], **extra}).encode(),
                   "/v1/embeddings")
    assert r.status_code == 200, r.text
    sent = world.bodies("local")[0]
    assert {k: sent[k] for k in extra} == extra


@pytest.mark.parametrize(
    ("body", "status", "model", "max_tokens"),
    [
        (b'{"model": "nope", "model": "demo", "max_tokens": -1, "max_tokens": 5,', 200,
         "demo", 5),
        (b'{"model": "demo", "model": "nope",', 404, None, None),
        (b'{"model": "demo", "max_tokens": 5, "max_tokens": -1,', 400, None, None),
    ],
)
async def test_duplicate_keys_the_upstream_sees_what_was_checked(
        client: httpx.AsyncClient, world: World, body: bytes, status: int,
        model: str | None, max_tokens: int | None) -> None:
    # The last one wins, and the body is sent on re-serialised: no key reaches an
    # upstream with a value the gateway did not check.
    r = await post(client, body + b' "messages": [{"role": "user", "content": "x"}]}')
    if status != 200:
        refused(r, status, "model" if status == 404 else "max_tokens")
        assert world.seen == []
        return
    assert r.status_code == 200, r.text
    sent = world.bodies("local")[0]
    assert (sent["model"], sent["max_tokens"]) == (model, max_tokens)


# --- headers ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "rid",
    [b"abc\r\nx-evil: 1", b"abc\rdef", b"a" * 129, b"x" * 100_000, "r\xe9q".encode("latin-1"),
     b"<script>", b"id with spaces", b"a\x00b"],
)
@pytest.mark.parametrize("ok", [True, False])
async def test_unsafe_request_id_is_replaced_not_echoed(client: httpx.AsyncClient,
                                                        rid: bytes, ok: bool) -> None:
    r = await client.post("/v1/chat/completions", content=chat() if ok else b"{",
                          headers=[(b"content-type", b"application/json"),
                                   (b"x-request-id", rid)])
    assert r.status_code == (200 if ok else 400)
    sent_back = r.headers["x-request-id"]
    assert len(sent_back) == 32 and all(c in "0123456789abcdef" for c in sent_back)


async def test_request_id_with_a_trailing_newline_is_replaced(
        client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", content=chat(),
                          headers=[(b"content-type", b"application/json"),
                                   (b"x-request-id", b"abc\n")])
    assert "\n" not in r.headers["x-request-id"]


async def test_safe_request_id_is_echoed_on_errors_too(client: httpx.AsyncClient) -> None:
    r = await post(client, b"{", **{"x-request-id": "req-1:a.b_c"})
    refused(r, 400)
    assert r.headers["x-request-id"] == "req-1:a.b_c"


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-spillover-route", b"everywhere"),
        ("x-spillover-route", b"local;hosted"),
        ("x-spillover-route", b"l\xf3cal"),
        ("x-spillover-route", b"local\r\nx-evil: 1"),
        ("x-spillover-route", b"x" * 50_000),
        ("x-spillover-residency", b"mars"),
        ("x-spillover-residency", b"onprem\x00"),
        ("x-spillover-residency", b"\xff\xfe"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/route/explain"])
async def test_junk_routing_headers_are_400_and_not_echoed(
        client: httpx.AsyncClient, world: World, header: str, value: bytes,
        path: str) -> None:
    r = await client.post(path, content=chat(), headers=[
        (b"content-type", b"application/json"), (header.encode(), value)])
    err = refused(r, 400, header)
    assert value.decode("latin-1") not in err["message"]
    assert world.seen == []


@pytest.mark.parametrize("value", ["LOCAL", " hosted ", "Auto"])
async def test_routing_headers_ignore_case_and_spaces(client: httpx.AsyncClient,
                                                      value: str) -> None:
    r = await post(client, chat(), **{"x-spillover-route": value})
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-route"] == (value.strip().lower().replace("auto", "local"))


async def test_bad_api_keys_are_401_and_never_echoed(world: World) -> None:
    key = "sk-spill-right"
    cfg = config(callers={"app": {"key_sha256": [key_digest(key)]}})
    async with lifespan_client(gateway_app(world, cfg, {"MISTRAL_API_KEY": SECRET})) as c:
        for auth in [None, b"", b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz",
                     b"Bearer sk-spill-wrong", b"Bearer " + b"k" * 100_000,
                     b"Bearer \xe9\xff", b"Bearer sk-spill-right\r\nx: y", SECRET.encode()]:
            headers = [(b"content-type", b"application/json")]
            if auth is not None:
                headers.append((b"authorization", auth))
            r = await c.post("/v1/chat/completions", content=chat(), headers=headers)
            err = refused(r, 401)
            assert "sk-" not in err["message"] and "kkk" not in err["message"]
        ok = await c.post("/v1/chat/completions", content=chat(),
                          headers={"authorization": f"Bearer {key}",
                                   "content-type": "application/json"})
        assert ok.status_code == 200, ok.text
    assert len(world.bodies("local")) == 1


# --- paths and methods -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nothing"), ("POST", "/v1/nothing"), ("POST", "/v1/chat/completion"),
     ("POST", "/v2/chat/completions"), ("GET", "/v1/" + "x" * 10_000),
     ("GET", "/v1/%00"), ("GET", "/v1/mod%C3%A9ls"),
     ("GET", "/.env"), ("GET", "/v1/../../etc/passwd")],
)
async def test_unknown_paths_are_404(client: httpx.AsyncClient, method: str,
                                     path: str) -> None:
    err = refused(await client.request(method, path), 404)
    assert err["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/completions", "POST"),
     ("DELETE", "/v1/embeddings", "POST"), ("PATCH", "/v1/route/explain", "POST"),
     ("POST", "/v1/models", "GET"), ("DELETE", "/v1/models", "GET"),
     ("OPTIONS", "/v1/chat/completions", "POST")],
)
async def test_wrong_methods_are_405_with_allow(client: httpx.AsyncClient, method: str,
                                                path: str, allow: str) -> None:
    refused(await client.request(method, path, content=chat()), 405)
    r = await client.request(method, path)
    assert allow in r.headers["allow"]

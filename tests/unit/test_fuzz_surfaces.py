"""The API surfaces kept out of the OpenAPI schema (Anthropic Messages, Responses, batch
files) get no schemathesis run in test_fuzz.py, so they are fuzzed here: bodies built from
each API's own field names with values of every JSON type, nested, duplicated, oversized
or missing. However wrong the body, the answer is never a 5xx and always an error in the
API's own shape; no upstream key ever shows.

A seeded generator rather than hypothesis: one app and one lifespan serve every case (an
app per example would make the test slow), and the seed makes any failure reproducible.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from tests.unit.helpers import HOSTED_KEY, World, gateway_app, lifespan_client

CASES = 250

MESSAGES_FIELDS = ("model", "messages", "system", "max_tokens", "tools", "tool_choice",
                   "stop_sequences", "temperature", "top_p", "top_k", "metadata", "stream",
                   "thinking")
RESPONSES_FIELDS = ("model", "input", "instructions", "tools", "tool_choice",
                    "max_output_tokens", "temperature", "top_p", "text", "stream", "store",
                    "previous_response_id", "metadata", "parallel_tool_calls")
BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "document", "message",
               "function_call", "function_call_output", "input_text", "bogus")


def value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, biased towards the shapes the APIs use (blocks, roles, ids)."""
    kind = rng.randrange(12 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2, 7, 2**31, 2**63, -(2**53)])
    if kind == 3:
        return rng.choice([0.0, -0.5, 0.7, 1.5, 1e308, -1e-9])
    if kind == 4:
        return rng.choice(["", "demo", "user", "assistant", "system", "tool", "auto", "any",
                           "none", "x" * 5000, "\u0000", "é\u2028", "toolu_01", "call_1"])
    if kind == 5:
        return "demo"
    if kind == 6:
        return rng.choice(BLOCK_TYPES)
    if kind in (7, 8):
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    # An object that looks like a message, a block or a tool.
    keys = rng.sample(("role", "content", "type", "text", "id", "name", "input",
                       "tool_use_id", "call_id", "arguments", "output", "source",
                       "input_schema", "parameters", "format", "schema"), rng.randrange(5))
    out = {k: value(rng, depth + 1) for k in keys}
    if rng.random() < 0.5:
        out["type"] = rng.choice(BLOCK_TYPES)
    return out


VALID_MESSAGES = {
    "model": "demo", "max_tokens": 16, "system": "be brief",
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "calling"},
            {"type": "tool_use", "id": "toolu_01", "name": "get", "input": {"q": 1}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "42"},
            {"type": "text", "text": "and?"}]}],
    "tools": [{"name": "get", "description": "d",
               "input_schema": {"type": "object", "properties": {"q": {"type": "integer"}}}}],
    "tool_choice": {"type": "auto"}, "stop_sequences": ["END"], "temperature": 0.5,
}
VALID_RESPONSES = {
    "model": "demo", "instructions": "be brief", "max_output_tokens": 16,
    "input": [
        {"role": "user", "content": "hi"},
        {"type": "function_call", "call_id": "call_1", "name": "get", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"},
        {"role": "user", "content": [{"type": "input_text", "text": "and?"}]}],
    "tools": [{"type": "function", "name": "get", "parameters": {"type": "object"}}],
    "tool_choice": "auto", "text": {"format": {"type": "text"}},
}


def body(rng: random.Random, fields: tuple[str, ...]) -> Any:
    """A valid request with a few mutations: a field set to anything, a field dropped, a
    message or block replaced; most cases stay close enough to valid to reach the
    translation and the relay, not only the first check."""
    if rng.random() < 0.03:
        return value(rng)  # not even an object
    out = json.loads(json.dumps(VALID_MESSAGES if "messages" in fields else VALID_RESPONSES))
    if rng.random() < 0.3:
        out["stream"] = True
    for _ in range(rng.randrange(4)):
        op = rng.randrange(4)
        if op == 0:
            out[rng.choice(fields)] = value(rng)
        elif op == 1 and out:
            out.pop(rng.choice(sorted(out)), None)
        else:
            turns = out.get("messages" if "messages" in fields else "input")
            if isinstance(turns, list) and turns:
                i = rng.randrange(len(turns))
                turn = turns[i]
                if op == 2 or not isinstance(turn, dict):
                    turns[i] = value(rng, 1)
                else:
                    content = turn.get("content")
                    if isinstance(content, list) and content:
                        j = rng.randrange(len(content))
                        block = content[j]
                        if isinstance(block, dict) and block and rng.random() < 0.6:
                            block[rng.choice(sorted(block))] = value(rng, 2)
                        else:
                            content[j] = value(rng, 2)
                    else:
                        turn[rng.choice(["role", "content", "type", "id"])] = value(rng, 2)
    return out


def anthropic_error(r: Any) -> None:
    data = r.json()
    assert data["type"] == "error", data
    assert set(data["error"]) >= {"type", "message"}, data


def openai_error(r: Any) -> None:
    data = r.json()
    assert set(data["error"]) == {"message", "type", "param", "code"}, data


@pytest.mark.parametrize(("path", "fields", "shape"), [
    ("/v1/messages", MESSAGES_FIELDS, anthropic_error),
    ("/v1/messages/count_tokens", MESSAGES_FIELDS, anthropic_error),
    ("/v1/responses", RESPONSES_FIELDS, openai_error),
])
async def test_no_body_gets_a_5xx_or_another_api_s_error(path: str, fields: tuple[str, ...],
                                                        shape: Any) -> None:
    rng = random.Random(f"{path}-7")
    world = World()
    async with lifespan_client(gateway_app(world)) as c:
        for i in range(CASES):
            sent = body(rng, fields)
            raw = json.dumps(sent) if rng.random() < 0.95 else '{"model": "demo", '
            r = await c.post(path, content=raw, headers={"content-type": "application/json"})
            context = f"case {i}: {raw[:300]}"
            assert r.status_code < 500, f"{context} -> {r.status_code} {r.text[:300]}"
            assert HOSTED_KEY not in r.text, context
            if r.status_code >= 400:
                shape(r)


async def test_batch_files_take_any_upload_without_a_5xx() -> None:
    rng = random.Random("files-7")
    async with lifespan_client(gateway_app(World())) as c:
        for i in range(60):
            lines = [json.dumps(value(rng) if rng.random() < 0.3 else {
                "custom_id": rng.choice(["a", "a", "b", "", None, 3]),
                "method": rng.choice(["POST", "GET", None]),
                "url": rng.choice(["/v1/chat/completions", "/v1/embeddings", "/v1/other"]),
                "body": value(rng)}) for _ in range(rng.randrange(0, 5))]
            content = "\n".join(lines).encode() if rng.random() < 0.9 else b"\xff\xfe{"
            r = await c.post("/v1/files", data={"purpose": rng.choice(["batch", "fine-tune"])},
                             files={"file": ("in.jsonl", content, "application/jsonl")})
            assert r.status_code < 500, f"case {i}: {content[:300]!r} -> {r.text[:300]}"
            if r.status_code >= 400:
                openai_error(r)
                continue
            r = await c.post("/v1/batches", json={
                "input_file_id": r.json()["id"], "completion_window": "24h",
                "endpoint": rng.choice(["/v1/chat/completions", "/v1/embeddings", "/x"])})
            assert r.status_code < 500, f"case {i}: {r.text[:300]}"
            if r.status_code >= 400:
                openai_error(r)


@pytest.mark.parametrize("odd", [{"a": 1}, ["auto"], None, 3])
async def test_an_unhashable_field_value_is_not_a_5xx_on_the_way_to_la_plateforme(
        odd: Any) -> None:
    # The translation checked `service_tier in a set`: an object there raised TypeError.
    world = World()
    async with lifespan_client(gateway_app(world)) as c:
        r = await c.post("/v1/chat/completions", headers={"x-spillover-route": "hosted"},
                         json={"model": "demo", "max_tokens": 4, "service_tier": odd,
                               "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            openai_error(r)
        assert world.bodies("hosted") or r.status_code >= 400


# Every optional top-level field of each API with the JSON types its docs give it. A value
# of any other type is refused with a 400 in the API's own shape that names the field,
# whether or not the gateway reads the field; an integer written as a float is an integer.
JSON_TYPES: dict[str, Any] = {"boolean": True, "integer": 3, "fraction": 0.5, "string": "x",
                              "array": [], "object": {}}
MESSAGES_OPTIONAL = {
    "system": ("string", "array"), "tools": ("array",), "tool_choice": ("object",),
    "stop_sequences": ("array",), "temperature": ("integer", "fraction"),
    "top_p": ("integer", "fraction"), "top_k": ("integer",), "metadata": ("object",),
    "stream": ("boolean",), "thinking": ("object",), "service_tier": ("string",),
    "container": ("string", "object"), "context_management": ("object",),
    "anthropic_version": ("string",), "betas": ("array",),
}
COUNT_OPTIONAL = {k: MESSAGES_OPTIONAL[k] for k in (
    "system", "tools", "tool_choice", "thinking", "context_management",
    "anthropic_version", "betas")}
RESPONSES_OPTIONAL = {
    "instructions": ("string",), "tools": ("array",), "tool_choice": ("string", "object"),
    "parallel_tool_calls": ("boolean",), "max_output_tokens": ("integer",),
    "temperature": ("integer", "fraction"), "top_p": ("integer", "fraction"),
    "text": ("object",), "stream": ("boolean",), "store": ("boolean",),
    "metadata": ("object",), "user": ("string",), "safety_identifier": ("string",),
    "reasoning": ("object",), "include": ("array",), "truncation": ("string",),
    "service_tier": ("string",), "prompt_cache_key": ("string",),
    "prompt_cache_retention": ("string",), "top_logprobs": ("integer",),
    "max_tool_calls": ("integer",), "stream_options": ("object",),
}


def _wrong_types(optional: dict[str, tuple[str, ...]]) -> list[tuple[str, Any]]:
    return [(name, value) for name, types in optional.items()
            for kind, value in JSON_TYPES.items() if kind not in types]


@pytest.mark.parametrize(("path", "optional", "base"), [
    ("/v1/messages", MESSAGES_OPTIONAL, VALID_MESSAGES),
    ("/v1/messages/count_tokens", COUNT_OPTIONAL,
     {k: v for k, v in VALID_MESSAGES.items() if k in ("model", "messages", "system")}),
    ("/v1/responses", RESPONSES_OPTIONAL, VALID_RESPONSES),
])
async def test_every_optional_field_of_a_wrong_type_is_refused_naming_it(
        path: str, optional: dict[str, tuple[str, ...]], base: dict[str, Any]) -> None:
    world = World()
    async with lifespan_client(gateway_app(world)) as c:
        r = await c.post(path, json=base)
        assert r.status_code == 200, r.text  # the base body itself is served
        cases = [*_wrong_types(optional), ("not_a_field", 1)]
        for field, wrong in cases:
            r = await c.post(path, json={**base, field: wrong})
            context = f"{field}={wrong!r}: {r.status_code} {r.text[:300]}"
            assert r.status_code == 400, context
            if path == "/v1/responses":
                openai_error(r)
                assert r.json()["error"]["param"] == field, context
            else:
                anthropic_error(r)
                err = r.json()["error"]
                assert err["type"] == "invalid_request_error", context
                assert err["message"].startswith(f"{field}: "), context
        # Nothing refused reached an engine: only the base body's own requests did.
        assert len(world.bodies("local")) + len(world.bodies("hosted")) <= 1


@pytest.mark.parametrize(("path", "field", "base"), [
    ("/v1/messages", "max_tokens", VALID_MESSAGES),
    ("/v1/responses", "max_output_tokens", VALID_RESPONSES),
])
async def test_an_integral_float_is_an_integer_and_a_fraction_is_refused(
        path: str, field: str, base: dict[str, Any]) -> None:
    world = World()
    async with lifespan_client(gateway_app(world)) as c:
        r = await c.post(path, json={**base, field: 30.0})
        assert r.status_code == 200, r.text
        (sent,) = world.bodies("local") or world.bodies("hosted")
        assert sent["max_tokens"] == 30 and isinstance(sent["max_tokens"], int), sent
        r = await c.post(path, json={**base, field: 30.5})
        assert r.status_code == 400, r.text
        if path == "/v1/responses":
            assert r.json()["error"]["param"] == field
        else:
            assert r.json()["error"]["message"].startswith(f"{field}: ")

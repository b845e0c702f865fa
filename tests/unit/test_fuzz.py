"""Schemathesis against the gateway's own OpenAPI schema: every /v1 operation, in-process
through ASGI, upstreams faked with MockTransport.

Valid bodies must be served; schema-violating ones refused with a 4xx, by the gateway
itself or by the engine it forwards them to (vLLM validates what the gateway does not,
and the fake engine here validates against the same schema). Either way the answer is
never a 5xx, every error is in OpenAI's shape, and no upstream key ever shows.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, settings
from schemathesis import Case, CheckContext, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from router.app import Settings, create_app
from router.http.schemas import (
    CHAT_BODY,
    COMPLETIONS_BODY,
    COUNT_TOKENS_BODY,
    EMBEDDINGS_BODY,
    ERROR_RESPONSES,
    EXPLAIN_BODY,
    MESSAGES_BODY,
    RESPONSES_BODY,
)
from tests.unit.helpers import BASE_YAML, World, chunk, completion, config, sse

SECRET = "sk-test-secret"
MAX_EXAMPLES = 50
# What routes.py publishes as each route's `openapi_extra`; set here too, so the test
# fuzzes the published contract whether or not the routes carry it yet.
PUBLISHED = {
    "/v1/chat/completions": CHAT_BODY,
    "/v1/completions": COMPLETIONS_BODY,
    "/v1/embeddings": EMBEDDINGS_BODY,
    "/v1/route/explain": EXPLAIN_BODY,
    "/v1/messages": MESSAGES_BODY,
    "/v1/messages/count_tokens": COUNT_TOKENS_BODY,
    "/v1/responses": RESPONSES_BODY,
}
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
ALL_ENDPOINTS = "endpoints: [chat, completions, fim, embeddings]"
# The demo alias, serving every endpoint locally and on La Plateforme.
BOTH_YAML = BASE_YAML.replace("port: 8101", f"port: 8101\n        {ALL_ENDPOINTS}").replace(
    "model: mistral-small-latest", f"model: mistral-small-latest\n        {ALL_ENDPOINTS}")
# Without La Plateforme: its translation drops the fields it does not know, so a
# violation in one of them would be served, not refused, and no engine could tell.
LOCAL_ONLY_YAML = BOTH_YAML.split("    hosted:")[0]


def gateway_app(world: World, yaml_text: str) -> FastAPI:
    app = create_app(Settings(env={"MISTRAL_API_KEY": SECRET}), config=config(yaml_text),
                     transport=world.transport())
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path.startswith("/v1/"):
            route.openapi_extra = PUBLISHED.get(route.path, {"responses": ERROR_RESPONSES})
    app.openapi_schema = None
    return app


def fuzzed_spec(app: FastAPI) -> dict[str, Any]:
    """The app's own schema, narrowed in two ways that change what is generated, not
    what is checked: positive cases name the model it serves (any other string is rightly
    a 404), and integers stay within 2**53, where every JSON reader agrees on them
    (schemathesis compares bounds like 2**63 - 1 as floats and oversteps them)."""
    spec = copy.deepcopy(app.openapi())
    for path in PUBLISHED:
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        body["schema"]["properties"]["model"] = {"enum": ["demo"]}
        _exact_bounds(body["schema"])
    return spec


def _exact_bounds(node: Any) -> None:
    if isinstance(node, dict):
        if "maximum" in node:
            node["maximum"] = min(node["maximum"], 2**53)
        if "minimum" in node:
            node["minimum"] = max(node["minimum"], -(2**53))
        for value in node.values():
            _exact_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _exact_bounds(value)


SPEC = fuzzed_spec(gateway_app(World(), BOTH_YAML))
# What a validating engine checks: the very request schemas the cases are drawn from.
ENGINE_SCHEMAS = {
    path: SPEC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
}


def engine(validate: bool) -> Any:
    """An upstream answering in the shape asked for; `validate`: like vLLM, it refuses a
    body its request schema does not accept, with vLLM's error JSON."""

    def handle(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        schema = ENGINE_SCHEMAS.get(req.url.path)
        if validate and schema is not None:
            error = jsonschema.exceptions.best_match(
                jsonschema.Draft202012Validator(schema).iter_errors(body))
            if error is not None:
                return httpx.Response(400, json={
                    "object": "error", "message": error.message[:200],
                    "type": "BadRequestError", "param": None, "code": 400})
        if req.url.path.endswith("/embeddings"):
            return httpx.Response(200, json={"object": "list", "model": body["model"], "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]})
        if body.get("stream") is True:
            return httpx.Response(200, content=sse([chunk(body["model"], "hi", finish="stop")]),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=completion(body["model"]))

    return handle


def fuzzed(mode: GenerationMode) -> Any:
    schema = schemathesis.openapi.from_dict(SPEC)
    # The same cases on every run: a fixed seed, and no strings mined from the source
    # (their order changes with the hash seed of each run).
    schema.config.seed = 20260101
    schema.config.analysis.constants.enabled = False
    schema.config.generation.update(modes=[mode], max_examples=MAX_EXAMPLES,
                                    deterministic=True, database="none")
    schema.config.output.sanitization.update(enabled=False)  # it hides any "*token*" field
    return schema.include(path_regex="^/v1/")


# One app per operation: schemathesis starts its lifespan at the first call and ends it
# when the test item ends (a gateway's lifespan runs once).
@pytest.fixture
def serving() -> FastAPI:
    """Both engines up and answering whatever they are sent."""
    return gateway_app(World(local=engine(validate=False), hosted=engine(validate=False)),
                       BOTH_YAML)


@pytest.fixture
def validating() -> FastAPI:
    return gateway_app(World(local=engine(validate=True)), LOCAL_ONLY_YAML)


def openai_error_shape(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """Every refusal in the API's own shape: OpenAI's, or Anthropic's on the Messages
    surface."""
    if 200 <= response.status_code < 300:
        return None
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    data = response.json()
    # Everything the Messages surface answers is Anthropic's, a wrong method (405)
    # included.
    if case.path in ANTHROPIC_PATHS:
        assert isinstance(data, dict), response.text[:500]
        assert {"type", "error"} <= set(data) <= {"type", "error", "request_id"}, data
        assert data["type"] == "error" and set(data["error"]) == {"type", "message"}, data
        assert isinstance(data["error"]["message"], str) and data["error"]["message"], data
        return True
    assert isinstance(data, dict) and set(data) == {"error"}, response.text[:500]
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    return True


def nothing_leaks(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    assert SECRET not in response.text and "Traceback" not in response.text, response.text[:500]
    for values in response.headers.values():
        assert all(SECRET not in v for v in values)
    return True


ALWAYS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, openai_error_shape, nothing_leaks]


# The app is made once per operation, not once per example: meant, not a hazard.
ONE_APP_PER_OPERATION = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzzed(GenerationMode.POSITIVE).parametrize()
@ONE_APP_PER_OPERATION
def test_valid_requests_are_served(case: Case[Any], serving: FastAPI) -> None:
    # /v1/usage takes `since` and `until` as unix seconds or ISO 8601, which its schema
    # does not say: any other string is rightly refused.
    # The Batch API's bodies are valid only with a JSONL file whose lines the schema cannot
    # describe, or the id of a file uploaded before: refused with a 4xx in OpenAI's shape,
    # which the other checks hold them to.
    # An integer written as a float (`"max_tokens": 30.0`) is an integer to JSON Schema
    # and to the Messages and Responses surfaces alike: no exception for them.
    accepted = [] if case.path == "/v1/usage" or case.path.startswith(
        ("/v1/files", "/v1/batches")) else [positive_data_acceptance]
    case.call_and_validate(app=serving, checks=[*ALWAYS, *accepted])


@fuzzed(GenerationMode.NEGATIVE).parametrize()
@ONE_APP_PER_OPERATION
def test_invalid_requests_are_refused(case: Case[Any], validating: FastAPI) -> None:
    # /v1/route/explain calls no engine: it refuses only what routing itself reads. The
    # Messages and Responses surfaces refuse every violation themselves (their engine
    # here does not validate): a wrong-typed optional field they do not read included.
    refused = [] if case.path == "/v1/route/explain" else [negative_data_rejection]
    case.call_and_validate(app=validating, checks=[*ALWAYS, *refused])


def test_the_schema_publishes_messages_count_tokens_and_responses_with_their_bodies() -> None:
    """/openapi.json documents the Anthropic and Responses surfaces as their docs do:
    request bodies with their required fields, answers, and each API's error shape."""
    app = create_app(Settings(env={}), config=config(BOTH_YAML), transport=World().transport())
    spec = app.openapi()
    paths = spec["paths"]

    def body(path: str) -> dict[str, Any]:
        op = paths[path]["post"]
        schema: dict[str, Any] = op["requestBody"]["content"]["application/json"]["schema"]
        assert op["requestBody"]["required"] is True
        return schema

    messages = body("/v1/messages")
    assert messages["title"] == "CreateMessageParams"
    assert set(messages["required"]) == {"model", "max_tokens", "messages"}
    assert {"system", "tools", "tool_choice", "stop_sequences", "temperature", "top_p",
            "top_k", "metadata", "stream"} <= set(messages["properties"])
    blocks = json.dumps(messages["properties"]["messages"])
    assert all(f'"const": "{t}"' in blocks for t in ("text", "image", "tool_use",
                                                      "tool_result"))
    answer = paths["/v1/messages"]["post"]["responses"]
    assert answer["200"]["content"]["application/json"]["schema"]["title"] == "Message"
    assert "text/event-stream" in answer["200"]["content"]
    error = answer["4XX"]["content"]["application/json"]["schema"]
    assert error["title"] == "AnthropicErrorResponse" and error["required"] == ["type", "error"]

    count = body("/v1/messages/count_tokens")
    assert set(count["required"]) == {"model", "messages"} and "max_tokens" not in count[
        "properties"]
    counted = paths["/v1/messages/count_tokens"]["post"]["responses"]["200"]
    assert counted["content"]["application/json"]["schema"]["required"] == ["input_tokens"]

    responses = body("/v1/responses")
    assert responses["title"] == "CreateResponse"
    assert set(responses["required"]) == {"model", "input"}
    assert {"instructions", "tools", "tool_choice", "max_output_tokens", "temperature",
            "top_p", "text", "stream", "store"} <= set(responses["properties"])
    items = json.dumps(responses["properties"]["input"])
    assert '"function_call"' in items and '"function_call_output"' in items
    r_answer = paths["/v1/responses"]["post"]["responses"]
    assert r_answer["200"]["content"]["application/json"]["schema"]["title"] == "Response"
    assert r_answer["4XX"]["content"]["application/json"]["schema"]["title"] == "ErrorResponse"
    # The Batch API's endpoints were already there; still are.
    assert {"/v1/files", "/v1/batches", "/v1/batches/{batch_id}/cancel"} <= set(paths)

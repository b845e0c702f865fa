"""The fake La Plateforme behaves like Mistral's API wherever the router depends on it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import openai
import pytest
from openai.types.chat import (
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)

from tests.fakes import DEFAULT_API_KEY, FakePlateforme, ServerThread, create_app

CHAT = "/v1/chat/completions"
MODEL = "mistral-small-latest"
AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
NINE_ALNUM = re.compile(r"[a-zA-Z0-9]{9}")


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def chat_body(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": list(messages or [user("hello there")]), **fields}


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def wait_for(predicate: Any, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# One server for the whole module; every test starts from a reset fake.
@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakePlateforme, str]]:
    fake = FakePlateforme()
    with ServerThread(create_app(fake)) as server:
        yield fake, server.url
        fake.release()  # no stalled request may hold up the shutdown


@pytest.fixture
def fake(served: tuple[FakePlateforme, str]) -> FakePlateforme:
    served[0].reset()
    return served[0]


@pytest.fixture
def http(served: tuple[FakePlateforme, str], fake: FakePlateforme) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[1], headers=AUTH, timeout=5) as client:
        yield client


@pytest.fixture
def client(served: tuple[FakePlateforme, str], fake: FakePlateforme) -> Iterator[openai.OpenAI]:
    url = served[1] + "/v1"
    with openai.OpenAI(base_url=url, api_key=DEFAULT_API_KEY, max_retries=0, timeout=5) as c:
        yield c


# --- happy paths --------------------------------------------------------------------------


def test_chat_answers_deterministically_and_logs_the_request(
    fake: FakePlateforme, client: openai.OpenAI
) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello there"}],
        extra_body={"random_seed": 7, "safe_prompt": False},  # Mistral's own fields
    )

    assert completion.choices[0].message.content == "hosted reply to: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 5)
    [logged] = fake.requests
    assert (logged.method, logged.path, logged.authorized) == ("POST", CHAT, True)
    assert logged.body["random_seed"] == 7
    assert logged.headers["authorization"] == "<redacted>"
    assert fake.counters == {"requests": 1, "served": 1}


def test_max_tokens_cuts_the_reply(http: httpx.Client) -> None:
    answer = http.post(CHAT, json=chat_body(max_tokens=2)).json()

    assert answer["choices"][0]["message"]["content"] == "hosted reply"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 2


def test_stream_comes_in_pieces_with_usage_on_the_last_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], stream=True
    )
    chunks = list(stream)

    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 2
    assert "".join(pieces) == "hosted reply to: hello there"
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.usage is not None and last.usage.total_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    tool = cast(ChatCompletionFunctionToolParam, WEATHER_TOOL)
    question: ChatCompletionMessageParam = {"role": "user", "content": "Weather in Paris?"}
    first = client.chat.completions.create(model=MODEL, messages=[question], tools=[tool])

    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.content == ""
    [call] = first.choices[0].message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert NINE_ALNUM.fullmatch(call.id)
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    follow_up: list[ChatCompletionMessageParam] = [
        question,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "18 C"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[tool])

    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "hosted reply to: Weather in Paris?"


def test_tool_call_streams_whole(http: httpx.Client) -> None:
    body = chat_body(user("weather please"), tools=[WEATHER_TOOL], stream=True)
    with http.stream("POST", CHAT, json=body) as response:
        events = sse_events(response)

    [call] = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert NINE_ALNUM.fullmatch(call["id"]) and call["function"]["name"] == "get_weather"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("tool_choice", "calls_tool"),
    [
        ("any", True),
        ("required", True),  # accepted by La Plateforme today, same meaning as "any"
        ({"type": "function", "function": {"name": "get_weather"}}, True),
        ("auto", False),  # the fake's model only reaches for tools when asked about weather
        ("none", False),
    ],
)
def test_tool_choice(http: httpx.Client, tool_choice: Any, calls_tool: bool) -> None:
    body = chat_body(tools=[WEATHER_TOOL], tool_choice=tool_choice)
    choice = http.post(CHAT, json=body).json()["choices"][0]

    assert (choice["finish_reason"] == "tool_calls") is calls_tool


def test_embeddings_agree_between_float_and_base64(
    http: httpx.Client, client: openai.OpenAI
) -> None:
    body = {"model": "mistral-embed", "input": ["a b", "c"], "encoding_format": "float"}
    as_floats = http.post("/v1/embeddings", json=body).json()
    # The openai client asks for base64 unless told otherwise; Mistral accepts it.
    as_base64 = client.embeddings.create(model="mistral-embed", input=["a b", "c"])

    assert as_floats["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    vectors = [d["embedding"] for d in as_floats["data"]]
    assert [len(v) for v in vectors] == [8, 8] and vectors[0] != vectors[1]
    for mine, theirs in zip(vectors, as_base64.data, strict=True):
        assert theirs.embedding == pytest.approx(mine, abs=1e-6)


def test_fim_answers_in_the_chat_completion_shape(http: httpx.Client) -> None:
    body = {"model": "codestral-latest", "prompt": "def add(a, b):", "suffix": "return c"}
    answer = http.post("/v1/fim/completions", json=body).json()

    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "hosted fill for: def add(a, b):"
    assert answer["usage"]["prompt_tokens"] == 5


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}

    assert {"mistral-small-latest", "codestral-latest", "mistral-embed"} <= ids


# --- validation, the way Mistral does it ----------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 1),
        ("user", "u1"),
        ("logit_bias", {"1": 2}),
        ("max_completion_tokens", 5),
        # service_tier was here: mistralai 3.7's ChatCompletionRequest now carries it.
        ("store", True),
        ("modalities", ["text"]),
    ],
)
def test_openai_only_fields_get_422(http: httpx.Client, field: str, value: Any) -> None:
    response = http.post(CHAT, json=chat_body(**{field: value}))

    assert response.status_code == 422
    [detail] = response.json()["message"]["detail"]
    assert detail["type"] == "extra_forbidden" and detail["loc"] == ["body", field]
    assert detail["msg"] == "Extra inputs are not permitted"


def test_stream_options_include_usage_gets_422(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )

    body: Any = raised.value.body
    assert body["message"]["detail"][0]["loc"] == ["body", "stream_options", "include_usage"]


def test_bad_tool_call_id_gets_mistrals_400(http: httpx.Client) -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [
        user("hi"),
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    response = http.post(CHAT, json=chat_body(*messages))

    assert response.status_code == 400
    assert response.json() == {
        "object": "error",
        "message": "Tool call id was call_1 but must be a-z, A-Z, 0-9, with a length of 9.",
        "type": "invalid_function_call",
        "param": None,
        "code": "3280",
    }


def test_unknown_tool_choice_gets_422(http: httpx.Client) -> None:
    response = http.post(CHAT, json=chat_body(tools=[WEATHER_TOOL], tool_choice="force"))

    assert response.status_code == 422
    [detail] = response.json()["message"]["detail"]
    assert detail["msg"] == "Input should be 'auto', 'none', 'any' or 'required'"


CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "status", "expected"),
    [
        ([{"role": "developer", "content": "be brief"}, user("hi")], 422, "union_tag_invalid"),
        ([{"role": "user", "content": "hi", "name": "bob"}], 422, "extra_forbidden"),
        ([user("hi"), {"role": "assistant", "content": "hello"}], 400, "Expected last role"),
        (
            [user("hi"), {"role": "tool", "tool_call_id": CALL["id"], "content": "x"}],
            400,
            "answers",
        ),
        (
            [user("hi"), {"role": "assistant", "content": "", "tool_calls": [CALL]}, user("?")],
            400,
            "Not the same number of function calls and responses",
        ),
    ],
    ids=["developer-role", "extra-message-field", "ends-with-assistant", "orphan-tool", "no-reply"],
)
def test_message_rules(
    http: httpx.Client, messages: list[dict[str, Any]], status: int, expected: str
) -> None:
    response = http.post(CHAT, json=chat_body(*messages))

    assert response.status_code == status
    assert expected in response.text


def test_assistant_prefix_may_end_the_conversation(http: httpx.Client) -> None:
    prefix = {"role": "assistant", "content": "Sure:", "prefix": True}

    assert http.post(CHAT, json=chat_body(user("hi"), prefix)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, chat_body(model="gpt-4o")),
        (CHAT, chat_body(model="mistral-embed")),
        ("/v1/embeddings", {"model": MODEL, "input": "x"}),
        ("/v1/fim/completions", {"model": MODEL, "prompt": "x"}),
    ],
)
def test_wrong_model_gets_invalid_model(http: httpx.Client, path: str, body: Any) -> None:
    response = http.post(path, json=body)

    assert response.status_code == 400
    assert response.json()["message"] == f"Invalid model: {body['model']}"


def test_fim_is_strict_and_legacy_completions_do_not_exist(http: httpx.Client) -> None:
    fim = {"model": "codestral-latest", "prompt": "x", "echo": True}

    assert http.post("/v1/fim/completions", json=fim).status_code == 422
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 404
    assert http.get("/v1/nowhere").status_code == 404


# --- auth and failure modes ---------------------------------------------------------------


def test_missing_or_wrong_key_gets_401(fake: FakePlateforme, http: httpx.Client) -> None:
    no_key = http.post(CHAT, json=chat_body(), headers={"Authorization": ""})
    wrong = http.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer nope"})

    assert (no_key.status_code, wrong.status_code) == (401, 401)
    assert wrong.json()["message"] == "Unauthorized"
    assert [r.authorized for r in fake.requests] == [False, False]
    assert fake.counters["unauthorized"] == 2


def test_429_mode_sends_retry_after(fake: FakePlateforme, client: openai.OpenAI) -> None:
    fake.mode = "429"
    fake.retry_after_s = 2

    with pytest.raises(openai.RateLimitError) as raised:
        client.models.list()

    assert raised.value.response.headers["retry-after"] == "2"


def test_fail_next_fails_only_the_next_requests(fake: FakePlateforme, http: httpx.Client) -> None:
    fake.fail_next(2, 503)

    statuses = [http.post(CHAT, json=chat_body()).status_code for _ in range(3)]

    assert statuses == [503, 503, 200]
    assert fake.counters["injected"] == 2


def test_unknown_mode_is_refused(fake: FakePlateforme) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        fake.mode = "flaky"


def test_stall_outlasts_a_client_deadline_and_notices_it_left(
    fake: FakePlateforme, http: httpx.Client
) -> None:
    fake.mode = "stall"
    fake.stall_s = 10
    started = time.monotonic()

    with pytest.raises(httpx.ReadTimeout):
        http.post(CHAT, json=chat_body(), timeout=0.3)

    assert time.monotonic() - started < 2
    wait_for(lambda: fake.counters.get("disconnected") == 1)
    assert len(fake.requests) == 1


def test_short_stall_then_answers(fake: FakePlateforme, http: httpx.Client) -> None:
    fake.mode = "stall"
    fake.stall_s = 0.2
    started = time.monotonic()

    assert http.post(CHAT, json=chat_body()).status_code == 200
    assert time.monotonic() - started >= 0.2


def test_stall_mid_stream_sends_one_chunk_then_nothing(
    fake: FakePlateforme, http: httpx.Client
) -> None:
    fake.mode = "stall_mid_stream"
    fake.stall_s = 10
    received: list[str] = []

    with pytest.raises(httpx.ReadTimeout):  # noqa: SIM117 - the stream must open inside
        with http.stream("POST", CHAT, json=chat_body(stream=True), timeout=0.3) as response:
            assert response.status_code == 200
            received.extend(line for line in response.iter_lines() if line)

    assert len(received) == 1 and received[0].startswith("data: {")
    wait_for(lambda: fake.counters.get("disconnected") == 1)


def test_latency_delays_every_answer(fake: FakePlateforme, http: httpx.Client) -> None:
    fake.latency_s = 0.15
    started = time.monotonic()

    http.get("/v1/models")

    assert time.monotonic() - started >= 0.15


def test_rejected_requests_are_logged_too(fake: FakePlateforme, http: httpx.Client) -> None:
    http.post(CHAT, json=chat_body(seed=3))
    http.post("/v1/completions", content=b"not json")

    seeded, legacy = fake.requests
    assert seeded.body["seed"] == 3 and seeded.path == CHAT
    assert legacy.body is None and legacy.path == "/v1/completions"
    assert fake.requests_to(CHAT) == [seeded]
    assert fake.counters == {"requests": 2, "rejected": 1, "not_found": 1}

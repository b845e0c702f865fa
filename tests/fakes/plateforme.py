"""A fake La Plateforme (https://api.mistral.ai/v1) that validates requests the way Mistral does.

Nothing in the test suite reaches the internet, so the router's Mistral adapter is tested
against this. The rules imitated below come from real API answers quoted in public issues
(mistralai/client-python#91, avante.nvim#2347, openai-agents-python#442, eca#233,
langchain#24668, ironclaw#1241) and from the request models of mistralai/client-python:

- Unknown request fields: 422, pydantic ``extra_forbidden`` ("Extra inputs are not
  permitted"), wrapped as ``{"object": "error", "message": {"detail": [...]}, ...}``. This
  covers OpenAI-only fields (``seed``, ``user``, ``logit_bias``, ``max_completion_tokens``,
  ...) and ``stream_options.include_usage``: Mistral always puts usage in the last chunk.
- Tool call ids must be exactly 9 characters of [a-zA-Z0-9]: 400 with
  "Tool call id was X but must be a-z, A-Z, 0-9, with a length of 9."
- ``tool_choice`` is "auto" | "none" | "any" | "required" or a named function.
- Unknown model: 400 "Invalid model: X".
- The last message must be from the user or a tool (or an assistant with ``prefix: true``),
  and every tool call needs its tool response.

Everything is deterministic except ids, which come from a seeded RNG.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import random
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast, get_args

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Mode = Literal["ok", "429", "500", "503", "stall", "stall_mid_stream"]
MODES: frozenset[str] = frozenset(get_args(Mode))

DEFAULT_API_KEY = "test-mistral-key"
DEFAULT_MODELS: frozenset[str] = frozenset(
    {
        "mistral-small-latest",
        "mistral-large-latest",
        "open-mistral-7b",
        "codestral-latest",
        "mistral-embed",
    }
)

TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# How often a stalled handler looks for a client disconnect or a release().
_POLL_S = 0.02


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it reached the fake, before any validation."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names; the authorization value is redacted
    body: Any  # parsed JSON, or None when the body was empty or not JSON
    authorized: bool
    at: float  # time.monotonic()


@dataclass(frozen=True)
class _Fault:
    status: int
    retry_after_s: float | None = None


class FakePlateforme:
    """Configuration and state of one fake La Plateforme; `create_app` serves it.

    Tests change `mode`, `latency_s`, ... from their own thread while uvicorn serves in
    another, so every read-modify-write of shared state happens under one lock.
    """

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        models: Iterable[str] = DEFAULT_MODELS,
        retry_after_s: float = 1.0,
        stall_s: float = 30.0,
        latency_s: float = 0.0,
        seed: int = 0,
        prompt_tokens: Callable[[Mapping[str, Any]], int] | None = None,
        answer_words: int = 0,
    ) -> None:
        """`prompt_tokens` counts a chat body's prompt as the provider bills it (default: its
        words; `v3_prompt_tokens` is Mistral's own tokenizer). `answer_words` pads each
        answer to that many words before max_tokens cuts it: a long-winded model."""
        self.api_key = api_key
        self.models: set[str] = set(models)
        self.retry_after_s = retry_after_s
        self.stall_s = stall_s
        self.latency_s = latency_s
        self._timings = (retry_after_s, stall_s, latency_s)  # what reset() goes back to
        self._seed = seed
        self.prompt_tokens = prompt_tokens
        self.answer_words = answer_words
        self._lock = threading.Lock()
        self._mode: Mode = "ok"
        self._requests: list[RecordedRequest] = []
        self._counters: Counter[str] = Counter()
        self._pending_faults: list[_Fault] = []
        self._rng = random.Random(seed)
        self._release_generation = 0
        # The Batch API: uploaded files, batch jobs; how long a job takes to run, and
        # whether jobs fail (FAILED with no output) instead.
        self.job_s = 0.0
        self.fail_jobs = False
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self._jobs_due: dict[str, tuple[float, list[dict[str, Any]]]] = {}

    # --- what tests drive -------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        self._mode = cast(Mode, mode)

    def fail_next(self, n: int, status: int, retry_after: float | None = None) -> None:
        """Answer the next `n` authenticated requests with `status`, whatever the mode."""
        with self._lock:
            self._pending_faults.extend([_Fault(status, retry_after)] * n)

    def release(self) -> None:
        """End every stall now in progress (the stalled requests then answer normally).

        Call it before stopping the server if a request may still be stalled: uvicorn
        otherwise waits timeout_graceful_shutdown, then cancels it with an ERROR log.
        """
        with self._lock:
            self._release_generation += 1

    def reset(self) -> None:
        """Back to the constructor's settings, mode "ok", empty log; ends running stalls."""
        with self._lock:
            self._mode = "ok"
            self.retry_after_s, self.stall_s, self.latency_s = self._timings
            self._requests.clear()
            self._counters.clear()
            self._pending_faults.clear()
            self._rng = random.Random(self._seed)
            self._release_generation += 1
            self.job_s, self.fail_jobs = 0.0, False
            self.files.clear()
            self.jobs.clear()
            self._jobs_due.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    @property
    def counters(self) -> dict[str, int]:
        """Copy of: requests, unauthorized, not_found, rejected, injected, served, disconnected."""
        with self._lock:
            return dict(self._counters)

    # --- what the app uses ------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._counters["requests"] += 1

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            if self._pending_faults:
                return self._pending_faults.pop(0)
        mode = self._mode
        if mode == "429":
            return _Fault(429, self.retry_after_s)
        if mode in ("500", "503"):
            return _Fault(int(mode))
        return None

    def _new_id(self, length: int = 32, alphabet: str = "0123456789abcdef") -> str:
        with self._lock:
            return "".join(self._rng.choices(alphabet, k=length))

    def _new_tool_call_id(self) -> str:
        return self._new_id(9, _ALNUM)

    async def _stall(self, request: Request | None) -> bool:
        """Wait `stall_s` or until release(); True when the client went away meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stall_s
        generation = self._release_generation
        while loop.time() < deadline and generation == self._release_generation:
            if request is not None and await request.is_disconnected():
                self._count("disconnected")
                return True
            await asyncio.sleep(_POLL_S)
        return False


# --- errors, shaped like Mistral's ------------------------------------------------------


class _ApiError(Exception):
    def __init__(
        self, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(dict(self.body), status_code=self.status, headers=self.headers)


def _error(status: int, message: str, type_: str, code: str | None = None) -> _ApiError:
    body = {"object": "error", "message": message, "type": type_, "param": None, "code": code}
    return _ApiError(status, body)


def _invalid_model(model: object) -> _ApiError:
    return _error(400, f"Invalid model: {model}", "invalid_model", "1500")


def _message_order(message: str) -> _ApiError:
    return _error(400, message, "invalid_request_message_order", "3230")


Detail = dict[str, Any]


def _detail(type_: str, loc: list[str | int], msg: str, input_: Any) -> Detail:
    return {"type": type_, "loc": loc, "msg": msg, "input": input_}


def _unprocessable(details: list[Detail]) -> _ApiError:
    # Mistral wraps FastAPI's {"detail": [...]} inside its own error envelope.
    body = {
        "object": "error",
        "message": {"detail": details},
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    return _ApiError(422, body)


def _raise_if(details: list[Detail]) -> None:
    if details:
        raise _unprocessable(details)


# --- request validation ------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    """The JSON type a field must have, with the pydantic error for anything else."""

    types: tuple[type, ...]
    error: str
    msg: str

    def accepts(self, value: Any) -> bool:
        # JSON true is a Python int subclass, yet pydantic rejects it where a number goes.
        if isinstance(value, bool) and not {bool, object} & set(self.types):
            return False
        return value is None or isinstance(value, self.types)


_STR = _Kind((str,), "string_type", "Input should be a valid string")
_INT = _Kind((int,), "int_type", "Input should be a valid integer")
_NUM = _Kind((int, float), "float_type", "Input should be a valid number")
_BOOL = _Kind((bool,), "bool_type", "Input should be a valid boolean")
_LIST = _Kind((list,), "list_type", "Input should be a valid list")
_DICT = _Kind((dict,), "dict_type", "Input should be a valid dictionary")
_STR_OR_LIST = _Kind((str, list), "string_type", "Input should be a valid string")
_ANY = _Kind((object,), "", "")

_CHAT_FIELDS: dict[str, _Kind] = {
    "model": _STR,
    "messages": _LIST,
    "temperature": _NUM,
    "top_p": _NUM,
    "max_tokens": _INT,
    "stream": _BOOL,
    "stop": _STR_OR_LIST,
    "random_seed": _INT,
    "response_format": _DICT,
    "tools": _LIST,
    "tool_choice": _ANY,  # checked by _check_tools
    "presence_penalty": _NUM,
    "frequency_penalty": _NUM,
    "n": _INT,
    "prediction": _DICT,
    "parallel_tool_calls": _BOOL,
    "safe_prompt": _BOOL,
    "prompt_mode": _STR,
    # The rest of mistralai 3.7's ChatCompletionRequest.
    "metadata": _DICT,
    "min_tokens": _INT,
    "repetition_penalty": _NUM,
    "top_k": _INT,
    "logprobs": _BOOL,
    "top_logprobs": _INT,
    "prompt_logprobs": _BOOL,
    "top_prompt_logprobs": _INT,
    "reasoning_effort": _STR,
    "guardrails": _LIST,
    "prompt_cache_key": _STR,
    "service_tier": _STR,
    # Known to Mistral, but it has no include_usage (usage always comes in the last chunk).
    "stream_options": _DICT,
}
_FIM_FIELDS: dict[str, _Kind] = {
    "model": _STR,
    "prompt": _STR,
    "suffix": _STR,
    "temperature": _NUM,
    "top_p": _NUM,
    "max_tokens": _INT,
    "min_tokens": _INT,
    "stream": _BOOL,
    "stop": _STR_OR_LIST,
    "random_seed": _INT,
    "metadata": _DICT,
    "prompt_cache_key": _STR,
}
_EMBEDDING_FIELDS: dict[str, _Kind] = {
    "model": _STR,
    "input": _STR_OR_LIST,
    "encoding_format": _STR,
    "output_dimension": _INT,
    "output_dtype": _STR,
}
_MESSAGE_FIELDS: dict[str, dict[str, _Kind]] = {
    "system": {"role": _STR, "content": _STR_OR_LIST},
    "user": {"role": _STR, "content": _STR_OR_LIST},
    "assistant": {"role": _STR, "content": _STR_OR_LIST, "tool_calls": _LIST, "prefix": _BOOL},
    "tool": {"role": _STR, "content": _STR_OR_LIST, "tool_call_id": _STR, "name": _STR},
}
_MESSAGE_REQUIRED: dict[str, set[str]] = {
    "system": {"content"},
    "user": {"content"},
    "assistant": set(),
    "tool": {"content"},
}
_TOOL_CALL_FIELDS: dict[str, _Kind] = {"id": _STR, "type": _STR, "function": _DICT, "index": _INT}
_CALLED_FUNCTION_FIELDS: dict[str, _Kind] = {"name": _STR, "arguments": _ANY}
_TOOL_FIELDS: dict[str, _Kind] = {"type": _STR, "function": _DICT}
_FUNCTION_FIELDS: dict[str, _Kind] = {
    "name": _STR,
    "description": _STR,
    "parameters": _DICT,
    "strict": _BOOL,
}
_TOOL_CHOICES = ("auto", "none", "any", "required")
_ENCODING_FORMATS = ("float", "base64")
_OUTPUT_DTYPES = ("float", "int8", "uint8", "binary", "ubinary")


def _check_object(
    obj: Mapping[str, Any],
    fields: Mapping[str, _Kind],
    required: Iterable[str],
    loc: list[str | int],
) -> list[Detail]:
    """Missing, extra and mistyped fields of one JSON object, as pydantic reports them."""
    details = [
        _detail("missing", [*loc, name], "Field required", dict(obj))
        for name in required
        if name not in obj
    ]
    for name, value in obj.items():
        kind = fields.get(name)
        if kind is None:
            details.append(
                _detail("extra_forbidden", [*loc, name], "Extra inputs are not permitted", value)
            )
        elif not kind.accepts(value):
            details.append(_detail(kind.error, [*loc, name], kind.msg, value))
    return details


def _check_body(body: Any, fields: Mapping[str, _Kind], required: Iterable[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise _unprocessable([_detail("model_attributes_type", ["body"], msg, body)])
    _raise_if(_check_object(body, fields, required, ["body"]))
    return body


def _check_enum(body: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> list[Detail]:
    value = body.get(name)
    if value is None or value in allowed:
        return []
    quoted = [f"'{a}'" for a in allowed]
    msg = f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}"
    return [_detail("enum", ["body", name], msg, value)]


def _check_messages(messages: list[Any]) -> None:
    if not messages:
        msg = "List should have at least 1 item after validation, not 0"
        raise _unprocessable([_detail("too_short", ["body", "messages"], msg, [])])
    details: list[Detail] = []
    tags = ", ".join(f"'{role}'" for role in sorted(_MESSAGE_FIELDS))
    for i, message in enumerate(messages):
        loc: list[str | int] = ["body", "messages", i]
        if not isinstance(message, dict) or "role" not in message:
            msg = "Unable to extract tag using discriminator 'role'"
            details.append(_detail("union_tag_not_found", loc, msg, message))
            continue
        role = message["role"]
        if role not in _MESSAGE_FIELDS:
            # e.g. OpenAI's "developer" role
            msg = (
                f"Input tag '{role}' found using 'role' does not match any of the"
                f" expected tags: {tags}"
            )
            details.append(_detail("union_tag_invalid", loc, msg, message))
            continue
        loc = [*loc, role]
        details += _check_object(message, _MESSAGE_FIELDS[role], _MESSAGE_REQUIRED[role], loc)
        for j, call in enumerate(message.get("tool_calls") or []):
            call_loc: list[str | int] = [*loc, "tool_calls", j]
            if not isinstance(call, dict):
                details.append(_detail("model_type", call_loc, "Input should be an object", call))
                continue
            details += _check_object(call, _TOOL_CALL_FIELDS, ("function",), call_loc)
            if isinstance(call.get("function"), dict):
                fn_loc = [*call_loc, "function"]
                required = ("name", "arguments")
                details += _check_object(
                    call["function"], _CALLED_FUNCTION_FIELDS, required, fn_loc
                )
    _raise_if(details)


def _check_tool_call_ids(messages: list[dict[str, Any]]) -> None:
    ids = [call.get("id") for m in messages for call in m.get("tool_calls") or []]
    ids += [m.get("tool_call_id") for m in messages if m["role"] == "tool"]
    for tool_call_id in ids:
        if tool_call_id is not None and not TOOL_CALL_ID.fullmatch(str(tool_call_id)):
            message = (
                f"Tool call id was {tool_call_id} but must be a-z, A-Z, 0-9, with a length of 9."
            )
            raise _error(400, message, "invalid_function_call", "3280")


def _check_message_order(messages: list[dict[str, Any]]) -> None:
    """Each assistant tool call needs its tool response right after it, and vice versa."""
    unanswered: list[str | None] = []
    for message in messages:
        if message["role"] == "tool":
            tool_call_id = message.get("tool_call_id")
            if tool_call_id is None and unanswered:
                unanswered.pop(0)  # Mistral pairs id-less responses by position
            elif tool_call_id in unanswered:
                unanswered.remove(tool_call_id)
            else:
                raise _message_order(
                    f"Tool message with tool_call_id {tool_call_id} answers no tool call"
                    " of the preceding assistant message"
                )
            continue
        if unanswered:
            raise _message_order("Not the same number of function calls and responses")
        if message["role"] == "assistant":
            unanswered = [call.get("id") for call in message.get("tool_calls") or []]
    last = messages[-1]
    if last["role"] not in ("user", "tool") and not (
        last["role"] == "assistant" and last.get("prefix") is True and not unanswered
    ):
        raise _message_order(
            "Expected last role User or Tool (or Assistant with prefix True) for serving"
            f" but got {last['role']}"
        )


def _check_tools(body: Mapping[str, Any]) -> None:
    details: list[Detail] = []
    for i, tool in enumerate(body.get("tools") or []):
        loc: list[str | int] = ["body", "tools", i]
        if not isinstance(tool, dict):
            details.append(_detail("model_type", loc, "Input should be an object", tool))
            continue
        details += _check_object(tool, _TOOL_FIELDS, ("function",), loc)
        if isinstance(tool.get("function"), dict):
            details += _check_object(
                tool["function"], _FUNCTION_FIELDS, ("name",), [*loc, "function"]
            )
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        named_ok = (
            set(choice) <= {"type", "function"}
            and isinstance(choice.get("function"), dict)
            and set(choice["function"]) == {"name"}
        )
        if not named_ok:
            msg = "Input should be a valid ToolChoice: {'type': 'function', 'function': {'name'}}"
            details.append(_detail("model_type", ["body", "tool_choice"], msg, choice))
    else:
        details += _check_enum(body, "tool_choice", _TOOL_CHOICES)
    _raise_if(details)


def _check_model(fake: FakePlateforme, model: str, usable: Callable[[str], bool]) -> None:
    if model not in fake.models or not usable(model):
        raise _invalid_model(model)


def _is_embedding_model(model: str) -> bool:
    return "embed" in model


def _is_fim_model(model: str) -> bool:
    return model.startswith("codestral")


# --- deterministic answers -----------------------------------------------------------------


def _text(content: Any) -> str:
    """The text of a message content: a string or a list of chunks like {"type": "text"}."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(chunk.get("text", "")) for chunk in content if isinstance(chunk, dict))
    return ""


def v3_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt tokens of a chat body as Mistral's v3 tokenizer (shipped in
    mistral_common) counts them, chat template included."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest(messages=body["messages"], tools=body.get("tools"))
    return len(_v3().encode_chat_completion(request).tokens)


@functools.cache
def _v3() -> Any:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from serving.demo_model import tokenizer_source

    return MistralTokenizer.from_file(str(tokenizer_source()))


def _words(text: str) -> int:
    return len(text.split())


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _cap(text: str, max_tokens: int | None) -> tuple[str, str]:
    """Text cut to max_tokens words (a word is a token here) and the finish_reason."""
    words = text.split()
    if max_tokens is None or len(words) <= max_tokens:
        return text, "stop"
    return " ".join(words[:max_tokens]), "length"


def _wants_tool_call(body: Mapping[str, Any]) -> bool:
    choice = body.get("tool_choice")
    if not body.get("tools") or choice == "none":
        return False
    if choice in ("any", "required") or isinstance(choice, dict):
        return True
    last = body["messages"][-1]
    return last["role"] == "user" and "weather" in _text(last.get("content")).lower()


def _chat_completion(fake: FakePlateforme, body: Mapping[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = body["messages"]
    if fake.prompt_tokens is not None:
        prompt_tokens = fake.prompt_tokens(body)
    else:
        prompt_tokens = sum(_words(_text(m.get("content"))) for m in messages)
    # Mistral sends content "" (not null) beside tool calls.
    message: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": None}
    if _wants_tool_call(body):
        choice = body.get("tool_choice")
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        name = name or body["tools"][0]["function"]["name"]
        arguments = json.dumps({"city": "Paris"})
        message["tool_calls"] = [
            {
                "id": fake._new_tool_call_id(),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
                "index": 0,
            }
        ]
        finish_reason, completion_tokens = "tool_calls", _words(arguments)
    else:
        last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
        asked = _text(last_user.get("content")) if last_user else ""
        reply = f"hosted reply to: {asked[:40]}"
        padding = fake.answer_words - _words(reply)
        if padding > 0:
            reply += " more" * padding
        content, finish_reason = _cap(reply, body.get("max_tokens"))
        message["content"] = content
        completion_tokens = _words(content)
    n = body.get("n") or 1
    return {
        "id": fake._new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {"index": i, "message": dict(message), "finish_reason": finish_reason} for i in range(n)
        ],
        "usage": _usage(prompt_tokens, completion_tokens * n),
    }


def _fim_completion(fake: FakePlateforme, body: Mapping[str, Any]) -> dict[str, Any]:
    prompt, suffix = body["prompt"], body.get("suffix") or ""
    content, finish_reason = _cap(f"hosted fill for: {prompt[:40]}", body.get("max_tokens"))
    # FIM answers in the chat.completion shape.
    return {
        "id": fake._new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "tool_calls": None},
                "finish_reason": finish_reason,
            }
        ],
        "usage": _usage(_words(prompt) + _words(suffix), _words(content)),
    }


def _chunks(completion: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A completion as the chat.completion.chunk sequence Mistral streams for it.

    Mistral has no stream_options.include_usage: usage rides on the final chunk, the one
    that carries finish_reason, instead of a separate chunk with empty choices.
    """
    head = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
    }

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    chunks: list[dict[str, Any]] = []
    for choice in completion["choices"]:
        index, message = choice["index"], choice["message"]
        chunks.append(chunk(index, {"role": "assistant", "content": ""}, None))
        # Several content pieces, so clients really have to reassemble the text.
        pieces = re.findall(r"\S+\s*", message["content"])
        chunks += [chunk(index, {"content": piece}, None) for piece in pieces]
        if message.get("tool_calls"):
            chunks.append(chunk(index, {"tool_calls": message["tool_calls"]}, None))
        chunks.append(chunk(index, {"content": ""}, choice["finish_reason"]))
    chunks[-1]["usage"] = completion["usage"]
    return chunks


def _embedding(text: str, dimension: int) -> list[float]:
    digest = hashlib.shake_256(text.encode()).digest(dimension)
    return [round(b / 127.5 - 1.0, 6) for b in digest]


def _embeddings(fake: FakePlateforme, body: Mapping[str, Any]) -> dict[str, Any]:
    inputs = [body["input"]] if isinstance(body["input"], str) else body["input"]
    dimension = body.get("output_dimension") or 8
    data = []
    for index, text in enumerate(inputs):
        vector: list[float] | str = _embedding(text, dimension)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimension}f", *vector)).decode()
        data.append({"object": "embedding", "embedding": vector, "index": index})
    tokens = sum(_words(text) for text in inputs)
    return {
        "id": fake._new_id(),
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": _usage(tokens, 0),
    }


# --- endpoints ---------------------------------------------------------------------------

Handler = Callable[[FakePlateforme, Any], Response]


async def _sse(fake: FakePlateforme, chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    completed = False
    try:
        for i, chunk in enumerate(chunks):
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            if i == 0 and fake.mode == "stall_mid_stream":
                await fake._stall(None)  # a disconnect cancels this generator
        yield b"data: [DONE]\n\n"
        completed = True
    finally:
        if not completed:
            fake._count("disconnected")


def _streams(body: Any) -> bool:
    return isinstance(body, dict) and body.get("stream") is True


def _answer(fake: FakePlateforme, body: Mapping[str, Any], completion: dict[str, Any]) -> Response:
    if _streams(body):
        return StreamingResponse(_sse(fake, _chunks(completion)), media_type="text/event-stream")
    return JSONResponse(completion)


def _chat(fake: FakePlateforme, raw: Any) -> Response:
    body = _check_body(raw, _CHAT_FIELDS, ("model", "messages"))
    details: list[Detail] = []
    for name, value in (body.get("stream_options") or {}).items():
        loc: list[str | int] = ["body", "stream_options", name]
        details.append(_detail("extra_forbidden", loc, "Extra inputs are not permitted", value))
    _raise_if(details)
    _check_messages(body["messages"])
    _check_tools(body)
    _check_model(fake, body["model"], lambda m: not _is_embedding_model(m))
    _check_tool_call_ids(body["messages"])
    _check_message_order(body["messages"])
    return _answer(fake, body, _chat_completion(fake, body))


def _fim(fake: FakePlateforme, raw: Any) -> Response:
    body = _check_body(raw, _FIM_FIELDS, ("model", "prompt"))
    _check_model(fake, body["model"], _is_fim_model)
    return _answer(fake, body, _fim_completion(fake, body))


def _embed(fake: FakePlateforme, raw: Any) -> Response:
    body = _check_body(raw, _EMBEDDING_FIELDS, ("model", "input"))
    details = _check_enum(body, "encoding_format", _ENCODING_FORMATS)
    details += _check_enum(body, "output_dtype", _OUTPUT_DTYPES)
    inputs = body["input"]
    if isinstance(inputs, list):
        details += [
            _detail("string_type", ["body", "input", i], "Input should be a valid string", item)
            for i, item in enumerate(inputs)
            if not isinstance(item, str)
        ]
    _raise_if(details)
    _check_model(fake, body["model"], _is_embedding_model)
    return JSONResponse(_embeddings(fake, body))


def _list_models(fake: FakePlateforme, _raw: Any) -> Response:
    data = [
        {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "mistralai",
            "capabilities": {
                "completion_chat": not _is_embedding_model(model),
                "completion_fim": _is_fim_model(model),
                "function_calling": not _is_embedding_model(model),
            },
        }
        for model in sorted(fake.models)
    ]
    return JSONResponse({"object": "list", "data": data})


# /v1/completions is deliberately absent: La Plateforme has no such endpoint (FIM lives at
# /v1/fim/completions), so a router that sends legacy completions there must get a 404.
_ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/v1/chat/completions"): _chat,
    ("POST", "/v1/fim/completions"): _fim,
    ("POST", "/v1/embeddings"): _embed,
    ("GET", "/v1/models"): _list_models,
}


_FILE_PURPOSES = ("fine-tune", "batch", "ocr")
_JOB_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/fim/completions",
                  "/v1/moderations", "/v1/chat/moderations", "/v1/ocr", "/v1/classifications")
_JOB_FIELDS = frozenset({"input_files", "requests", "endpoint", "model", "agent_id",
                         "metadata", "timeout_hours"})


async def _batch_api(fake: FakePlateforme, request: Request, raw: bytes) -> Response:
    """Files (multipart upload with purpose, content) and batch jobs (create, get, cancel),
    as La Plateforme documents them. A job runs `fake.job_s` after its creation, at the
    first look after that: every line through the chat handler (SUCCESS), or FAILED."""
    method, parts = request.method, request.url.path.strip("/").split("/")
    if parts[:2] == ["v1", "files"]:
        if method == "POST" and len(parts) == 2:
            form = await request.form()
            upload, purpose = form.get("file"), form.get("purpose")
            details: list[Detail] = []
            if upload is None or isinstance(upload, str):
                details.append(_detail("missing", ["body", "file"], "Field required", None))
            if purpose not in _FILE_PURPOSES:
                details.append(_detail("enum", ["body", "purpose"],
                                       "Input should be 'fine-tune', 'batch' or 'ocr'", purpose))
            _raise_if(details)
            assert upload is not None and not isinstance(upload, str)
            content = await upload.read()
            fid = _uuid(fake)
            with fake._lock:
                fake.files[fid] = {"id": fid, "object": "file", "bytes": len(content),
                                   "created_at": int(time.time()),
                                   "filename": upload.filename, "purpose": purpose,
                                   "sample_type": "batch_request", "source": "upload",
                                   "num_lines": content.count(b"\n"), "content": content}
            return JSONResponse({k: v for k, v in fake.files[fid].items() if k != "content"})
        if method == "GET" and len(parts) == 4 and parts[3] == "content":
            f = fake.files.get(parts[2])
            if f is None:
                raise _error(404, "File not found", "invalid_request_error")
            return Response(f["content"], media_type="application/octet-stream")
        raise _error(404, "Not found", "invalid_request_error")
    # /v1/batch/jobs[/{id}[/cancel]]
    if method == "POST" and len(parts) == 3:
        body = json.loads(raw) if raw else None
        if not isinstance(body, dict):
            raise _unprocessable([_detail("model_attributes_type", ["body"],
                                          "Input should be a valid dictionary", body)])
        details = [_detail("extra_forbidden", ["body", k], "Extra inputs are not permitted",
                           body[k]) for k in body if k not in _JOB_FIELDS]
        if body.get("endpoint") not in _JOB_ENDPOINTS:
            details.append(_detail("enum", ["body", "endpoint"], "Input should be a known "
                                   "endpoint", body.get("endpoint")))
        files = body.get("input_files")
        if not isinstance(files, list) or not files or not all(f in fake.files for f in files):
            details.append(_detail("value_error", ["body", "input_files"],
                                   "input_files must name uploaded files", files))
        elif any(fake.files[f]["purpose"] != "batch" for f in files):
            details.append(_detail("value_error", ["body", "input_files"],
                                   "input files must have purpose batch", files))
        hours = body.get("timeout_hours", 24)
        if not isinstance(hours, int) or isinstance(hours, bool) or hours < 1:
            details.append(_detail("int_type", ["body", "timeout_hours"],
                                   "Input should be a valid integer", hours))
        meta = body.get("metadata")
        if meta is not None and not (isinstance(meta, dict)
                                     and all(isinstance(v, str) for v in meta.values())):
            details.append(_detail("dict_type", ["body", "metadata"],
                                   "metadata values must be strings", meta))
        _raise_if(details)
        if not isinstance(body.get("model"), str) or body["model"] not in fake.models:
            raise _invalid_model(body.get("model"))
        jid = _uuid(fake)
        assert isinstance(files, list)
        lines = [json.loads(x) for f in files for x in fake.files[f]["content"].splitlines()
                 if x.strip()]
        for n, line in enumerate(lines, 1):
            if not isinstance(line.get("custom_id"), str) or not isinstance(line.get("body"),
                                                                           dict):
                raise _error(400, f"line {n}: custom_id and body are required",
                             "invalid_request_error")
        job = {"id": jid, "object": "batch", "input_files": files, "metadata": meta,
               "endpoint": body["endpoint"], "model": body["model"], "agent_id": None,
               "output_file": None, "error_file": None, "errors": [], "status": "QUEUED",
               "created_at": int(time.time()), "total_requests": len(lines),
               "completed_requests": 0, "succeeded_requests": 0, "failed_requests": 0,
               "started_at": None, "completed_at": None}
        with fake._lock:
            fake.jobs[jid] = job
            fake._jobs_due[jid] = (time.monotonic() + fake.job_s, lines)
        return JSONResponse(job)
    if method == "GET" and len(parts) == 3:
        return _list_jobs(fake, request)
    found = fake.jobs.get(parts[3]) if len(parts) >= 4 else None
    if found is None:
        raise _error(404, "Batch job not found", "invalid_request_error")
    job = found
    if method == "POST" and len(parts) == 5 and parts[4] == "cancel":
        if job["status"] in ("QUEUED", "RUNNING"):
            job["status"] = "CANCELLED"  # nothing of it has run yet in the fake
            job["completed_at"] = int(time.time())
        return JSONResponse(job)
    if method == "GET" and len(parts) == 4:
        _advance(fake, job)
        return JSONResponse(job)
    raise _error(405, "Method not allowed", "invalid_request_error")


_JOB_STATUSES = ("QUEUED", "RUNNING", "SUCCESS", "FAILED", "TIMEOUT_EXCEEDED",
                 "CANCELLATION_REQUESTED", "CANCELLED")
# GET /v1/batch/jobs's own query parameters (Mistral's JobsAPIRoutesBatchGetBatchJobsRequest).
# Its `metadata` filter is an object sent form-exploded: every other parameter is one of
# its pairs, and a job is listed only when its metadata holds them all.
_LIST_PARAMS = frozenset({"page", "page_size", "model", "agent_id", "created_after",
                          "created_by_me", "status", "order_by"})


def _list_jobs(fake: FakePlateforme, request: Request) -> Response:
    """GET /v1/batch/jobs: the jobs matching the filters, a page at a time, newest first
    unless order_by=created; every parameter validated as the SDK's request model types it."""
    q = request.query_params
    details: list[Detail] = []

    def integer(name: str, default: int, least: int) -> int:
        raw = q.get(name)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) < least:
            details.append(_detail("int_parsing", ["query", name],
                                   f"Input should be an integer >= {least}", raw))
            return default
        return int(raw)

    page, size = integer("page", 0, 0), integer("page_size", 100, 1)
    for name in ("page", "page_size", "model", "agent_id", "created_after", "created_by_me",
                 "order_by"):
        if len(q.getlist(name)) > 1:
            details.append(_detail("string_type", ["query", name],
                                   "Input should be a single value", q.getlist(name)))
    mine = q.get("created_by_me", "false")
    if mine not in ("true", "false"):
        details.append(_detail("bool_parsing", ["query", "created_by_me"],
                               "Input should be a valid boolean", mine))
    order = q.get("order_by", "-created")
    if order not in ("created", "-created"):
        details.append(_detail("enum", ["query", "order_by"],
                               "Input should be 'created' or '-created'", order))
    statuses = q.getlist("status")
    for st in statuses:
        if st not in _JOB_STATUSES:
            details.append(_detail("enum", ["query", "status"], "Input should be a batch job "
                                   "status", st))
    after = None
    if "created_after" in q:
        try:
            after = datetime.fromisoformat(q["created_after"]).timestamp()
        except ValueError:
            details.append(_detail("datetime_parsing", ["query", "created_after"],
                                   "Input should be a valid datetime", q["created_after"]))
    _raise_if(details)
    wanted = {k: v for k, v in q.multi_items() if k not in _LIST_PARAMS}
    with fake._lock:
        jobs = list(fake.jobs.values())
    picked = [j for j in jobs
              if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())
              and ("model" not in q or j["model"] == q["model"])
              and (not statuses or j["status"] in statuses)
              and (after is None or j["created_at"] >= after)]
    # Jobs created within one second keep their creation order (dicts keep insertion order).
    if order == "-created":
        picked.reverse()
    return JSONResponse({"object": "list", "total": len(picked),
                         "data": picked[page * size:(page + 1) * size]})


def _advance(fake: FakePlateforme, job: dict[str, Any]) -> None:
    due, lines = fake._jobs_due.get(job["id"], (0.0, []))
    if job["status"] not in ("QUEUED", "RUNNING"):
        return
    if time.monotonic() < due:
        job["status"], job["started_at"] = "RUNNING", job["started_at"] or int(time.time())
        return
    job["completed_at"] = int(time.time())
    if fake.fail_jobs:
        job["status"] = "FAILED"
        job["errors"] = [{"message": "Injected job failure", "count": 1}]
        return
    out = bytearray()
    for line in lines:
        answer = _chat_completion(fake, {**line["body"], "model": job["model"]})
        out += json.dumps({"id": _uuid(fake), "custom_id": line["custom_id"],
                           "response": {"status_code": 200, "body": answer},
                           "error": None}).encode() + b"\n"
    fid = _uuid(fake)
    fake.files[fid] = {"id": fid, "object": "file", "bytes": len(out), "filename":
                       f"{job['id']}.jsonl", "purpose": "batch", "content": bytes(out),
                       "created_at": int(time.time()), "sample_type": "batch_result",
                       "source": "mistral", "num_lines": len(lines)}
    job.update(status="SUCCESS", output_file=fid, completed_requests=len(lines),
               succeeded_requests=len(lines))
    fake._count("batch_jobs_served")


def _uuid(fake: FakePlateforme) -> str:
    h = fake._new_id(32)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _fault_response(fault: _Fault) -> JSONResponse:
    if fault.status == 429:
        error = _error(429, "Requests rate limit exceeded", "rate_limited", "1300")
        if fault.retry_after_s is not None:
            error.headers["Retry-After"] = f"{fault.retry_after_s:g}"
    elif fault.status >= 500:
        error = _error(fault.status, "Internal server error", "internal_server_error", "1000")
    else:
        error = _error(fault.status, "Injected failure", "invalid_request_error")
    return error.response()


def create_app(fake: FakePlateforme) -> Starlette:
    """An ASGI app serving `fake`; run it with tests.fakes.server.ServerThread."""

    async def endpoint(request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        authorization = request.headers.get("authorization")
        authorized = authorization == f"Bearer {fake.api_key}"
        headers = {
            k: ("<redacted>" if k == "authorization" else v) for k, v in request.headers.items()
        }
        # Logged before anything else so a test can tell "rejected" from "never arrived".
        fake._record(
            RecordedRequest(
                request.method, request.url.path, headers, body, authorized, time.monotonic()
            )
        )

        if request.url.path.startswith(("/v1/files", "/v1/batch/jobs")):
            if not authorized:
                return JSONResponse({"message": "Unauthorized"}, status_code=401)
            try:
                return await _batch_api(fake, request, raw)
            except _ApiError as error:
                fake._count("rejected")
                return error.response()
        handler = _ROUTES.get((request.method, request.url.path))
        if handler is None:
            fake._count("not_found")
            known_path = any(path == request.url.path for _, path in _ROUTES)
            if known_path:
                return JSONResponse({"detail": "Method Not Allowed"}, status_code=405)
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if not authorized:
            fake._count("unauthorized")
            return JSONResponse(
                {"message": "Unauthorized", "request_id": fake._new_id()}, status_code=401
            )
        fault = fake._take_fault()
        if fault is not None:
            fake._count("injected")
            return _fault_response(fault)
        stalls = fake.mode == "stall" or (fake.mode == "stall_mid_stream" and not _streams(body))
        if stalls and await fake._stall(request):
            return Response(status_code=499)  # nobody is listening any more
        if fake.latency_s > 0:
            await asyncio.sleep(fake.latency_s)
        if raw and body is None:
            fake._count("rejected")
            msg = "JSON decode error"
            return _unprocessable([_detail("json_invalid", ["body", 0], msg, {})]).response()
        try:
            response = handler(fake, body)
        except _ApiError as error:
            fake._count("rejected")
            return error.response()
        fake._count("served")
        return response

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])


__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_MODELS",
    "MODES",
    "TOOL_CALL_ID",
    "FakePlateforme",
    "Mode",
    "RecordedRequest",
    "create_app",
    "v3_prompt_tokens",
]

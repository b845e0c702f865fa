"""Anthropic's Messages API <-> OpenAI chat completions, as pure functions.

A Messages request becomes a chat completions request before routing, so it takes the
same way as any chat request (aliases, licences, residency, budgets, the per-backend
translators: La Plateforme's 9-character tool-call ids are mapped there and back), and
the chat answer, whole or streamed, becomes a Message again for the caller.

    request_to_chat      Messages request  -> chat completions request (validated)
    chat_to_message      chat completion   -> Message
    MessageStream        chat chunks       -> Messages stream events
    anthropic_error      status + message  -> Anthropic's error JSON (503 becomes 529)

Tool ids keep the caller's spelling: a `tool_use` id becomes the chat `tool_calls[].id`,
a `tool_result`'s `tool_use_id` its `tool_call_id`, so the id mapping the chat translators
already do (stable hashes, restored in the answer) holds across turns and backends.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
)

from router.errors import InvalidRequest
from router.providers.shapes import arguments_object, first_error, integral, text_only

# Tools that run on Anthropic's servers (web search, code execution, computer use...):
# nothing here runs them, so asking for one is refused rather than silently dropped.
# Tuples, not sets: a caller's value may be a list or an object, which a set cannot hash.
_CLIENT_TOOL_TYPES = (None, "custom")
_STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "model_length": "max_tokens",
                "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# Anthropic's error types by status; 503 (no capacity anywhere) is its 529.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "billing_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                504: "timeout_error", 529: "overloaded_error"}
_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def _bad(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param)


# -- the request's shape -------------------------------------------------------------
# What Anthropic documents for each field (and /openapi.json publishes), checked once
# per request by pydantic-core after the translation below, which words the refusals
# it knows better (server tools, stateful fields, empty turns). Strict, as Anthropic's
# validation is in effect: a string is no number, a number no boolean; an integer
# written as a float (`30.0`) is taken, `30.5` refused (router.providers.shapes.integral).
# Unknown top-level fields are refused as Anthropic refuses them ("Extra inputs are not
# permitted"); blocks and tools keep fields of their own (cache_control, citations...).

_Int = Annotated[int, BeforeValidator(integral)]
_NonEmpty = Annotated[str, StringConstraints(min_length=1)]
_Name = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
_Unit = Annotated[float, Field(ge=0, le=1)]


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Text(_Part):
    type: Literal["text"]
    text: str


class _Base64(_Part):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class _Url(_Part):
    type: Literal["url"]
    url: str


class _Image(_Part):
    type: Literal["image"]
    source: Annotated[_Base64 | _Url, Field(discriminator="type")]


class _ToolUse(_Part):
    type: Literal["tool_use"]
    id: _NonEmpty
    name: _NonEmpty
    input: dict[str, Any]


class _ToolResult(_Part):
    type: Literal["tool_result"]
    tool_use_id: _NonEmpty
    content: str | list[_Text] = ""
    is_error: bool = False


class _Thinking(_Part):  # Claude's reasoning, sent back in a later turn: skipped
    type: Literal["thinking", "redacted_thinking"]


def _tag(key: str) -> Any:
    return lambda v: v.get(key) if isinstance(v, dict) else None


_UserBlock = Annotated[_Text | _Image | _ToolResult, Field(discriminator="type")]
_AssistantBlock = Annotated[_Text | _ToolUse | _Thinking, Field(discriminator="type")]


class _UserTurn(_Part):
    role: Literal["user"]
    content: str | Annotated[list[_UserBlock], Field(min_length=1)]


class _AssistantTurn(_Part):
    role: Literal["assistant"]
    content: str | Annotated[list[_AssistantBlock], Field(min_length=1)]


_Turn = Annotated[Annotated[_UserTurn, Tag("user")] | Annotated[_AssistantTurn, Tag("assistant")],
                  Discriminator(_tag("role"))]


class _Tool(_Part):
    type: Literal["custom"] = "custom"
    name: _Name
    description: str = ""
    input_schema: dict[str, Any]


class _ChoiceKind(_Part):
    type: Literal["auto", "any", "none"]
    disable_parallel_tool_use: bool = False


class _ChoiceTool(_Part):
    type: Literal["tool"]
    name: _Name
    disable_parallel_tool_use: bool = False


class _Metadata(_Part):
    user_id: str | None = None


class _Prompt(BaseModel):
    """What count_tokens takes; a Messages request takes more (_Create)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: _NonEmpty
    messages: Annotated[list[_Turn], Field(min_length=1)]
    system: str | list[_Text] | None = None
    tools: list[_Tool] | None = None
    tool_choice: Annotated[_ChoiceKind | _ChoiceTool, Field(discriminator="type")] | None = None
    # Documented, read by nothing here: extended thinking (vLLM takes it natively), the
    # context management of Claude Code's requests, the version/betas some SDKs put in
    # the body.
    thinking: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None
    anthropic_version: str | None = None
    betas: list[str] | None = None


class _Create(_Prompt):
    max_tokens: Annotated[_Int, Field(ge=1, le=2**63 - 1)]
    stop_sequences: list[_NonEmpty] | None = None
    temperature: _Unit | None = None
    top_p: _Unit | None = None
    top_k: Annotated[_Int, Field(ge=0)] | None = None
    metadata: _Metadata | None = None
    stream: bool | None = None
    # Anthropic's own service tiers and code-execution containers: no counterpart on an
    # open-weight engine; an SDK that sends them still gets its answer.
    service_tier: Literal["auto", "standard_only"] | None = None
    container: str | dict[str, Any] | None = None


_PROMPT = _Prompt.__pydantic_validator__
_CREATE = _Create.__pydantic_validator__


def _validate(body: Mapping[str, Any], count_only: bool) -> None:
    """Refuse what the translation let through as Anthropic would: a 400 naming the
    field (`metadata.user_id: Input should be a valid string`)."""
    try:
        (_PROMPT if count_only else _CREATE).validate_python(body)
    except ValidationError as exc:
        _, path, msg = first_error(exc, body)
        param = ".".join(str(p) for p in path) or None
        raise _bad(f"{param}: {msg}" if param else msg, param) from None


# -- request -------------------------------------------------------------------------

def request_to_chat(body: Mapping[str, Any], *, count_only: bool = False) -> dict[str, Any]:
    """The chat completions request for a Messages request (or a count_tokens request,
    which has no max_tokens and generates nothing). Raises InvalidRequest, worded as
    Anthropic words its own, for what the Messages API would refuse."""
    out = _translate(body, count_only)
    _validate(body, count_only)
    return out


def _translate(body: Mapping[str, Any], count_only: bool) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: Field required" if model is None else "model: must be a string",
                   "model")
    out: dict[str, Any] = {"model": model}
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _system_text(system)})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages: Field required" if raw is None
                   else "messages: must be a non-empty array", "messages")
    for i, msg in enumerate(raw):
        messages.extend(_message(msg, i))
    out["messages"] = messages

    tools = body.get("tools")
    if tools is not None:
        out["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        _tool_choice(choice, out)
    if count_only:
        return out

    max_tokens = integral(body.get("max_tokens"))
    if max_tokens is None:
        raise _bad("max_tokens: Field required", "max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad("max_tokens: must be an integer of at least 1", "max_tokens")
    out["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        v = body.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise _bad(f"{key}: must be a number from 0 to 1", key)
            out[key] = v
    top_k = integral(body.get("top_k"))
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise _bad("top_k: must be a non-negative integer", "top_k")
        out["top_k"] = top_k
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop_sequences: must be an array of non-empty strings",
                       "stop_sequences")
        if stops:
            out["stop"] = list(stops)
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("metadata: must be an object", "metadata")
        user = metadata.get("user_id")
        if user is not None and not isinstance(user, str):
            raise _bad("metadata.user_id: must be a string", "metadata.user_id")
        if user:
            out["user"] = user  # OpenAI's end-user field; La Plateforme's translator drops it
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: must be a boolean", "stream")
    if stream:
        out["stream"] = True
        # The Message's usage comes from the last chunk: always ask for it.
        out["stream_options"] = {"include_usage": True}
    return out


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        parts = []
        for j, block in enumerate(system):
            if not (isinstance(block, dict) and block.get("type") == "text"
                    and isinstance(block.get("text"), str)):
                raise _bad(f"system.{j}: only text blocks are accepted", f"system.{j}")
            parts.append(block["text"])
        return "\n".join(parts)
    raise _bad("system: must be a string or an array of text blocks", "system")


def _message(msg: Any, i: int) -> list[dict[str, Any]]:
    where = f"messages.{i}"
    if not isinstance(msg, dict):
        raise _bad(f"{where}: must be an object", where)
    role = msg.get("role")
    if role not in ("user", "assistant"):
        raise _bad(f"{where}.role: must be 'user' or 'assistant'", f"{where}.role")
    content = msg.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content: must be a string or an array of content blocks",
                   f"{where}.content")
    if role == "assistant":
        return [_assistant(content, where)]
    return _user(content, where)


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        at = f"{where}.content.{j}"
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "tool_use":
            tid, name, args = b.get("id"), b.get("name"), b.get("input", {})
            if not (isinstance(tid, str) and tid and isinstance(name, str) and name):
                raise _bad(f"{at}: tool_use needs a string id and name", at)
            if not isinstance(args, dict):
                raise _bad(f"{at}.input: must be an object", f"{at}.input")
            calls.append({"id": tid, "type": "function",
                          "function": {"name": name, "arguments": orjson.dumps(args).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # reasoning Claude produced: no open-weight model reads it back
        else:
            raise _bad(f"{at}: an assistant turn takes text and tool_use blocks", at)
    out: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        out["tool_calls"] = calls
    elif out["content"] is None:
        out["content"] = ""
    return out


def _user(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    # Chat wants each tool result as its own message right after the assistant's calls,
    # so results go first and the rest of the turn follows as one user message.
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        at = f"{where}.content.{j}"
        if kind == "text" and isinstance(b.get("text"), str):
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(b, at)}})
        elif kind == "tool_result":
            tid = b.get("tool_use_id")
            if not isinstance(tid, str) or not tid:
                raise _bad(f"{at}.tool_use_id: Field required", f"{at}.tool_use_id")
            text = _result_text(b.get("content", ""), at)
            if b.get("is_error") is True:
                text = f"Error: {text}" if text else "Error"
            results.append({"role": "tool", "tool_call_id": tid, "content": text})
        else:
            raise _bad(f"{at}: a user turn takes text, image and tool_result blocks", at)
    out = results
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "".join(p["text"] for p in parts)}
                       if len(parts) == 1 else {"role": "user", "content": parts})
        else:
            out.append({"role": "user", "content": parts})
    if not out:
        raise _bad(f"{where}.content: must not be empty", f"{where}.content")
    return out


def _image_url(b: dict[str, Any], at: str) -> str:
    src = b.get("source")
    kind = src.get("type") if isinstance(src, dict) else None
    if kind == "base64" and isinstance(src, dict):
        media, data = src.get("media_type"), src.get("data")
        if media not in _IMAGE_TYPES or not isinstance(data, str):
            raise _bad(f"{at}.source: base64 images need media_type (image/jpeg, "
                       "image/png, image/gif or image/webp) and data", f"{at}.source")
        return f"data:{media};base64,{data}"
    if kind == "url" and isinstance(src, dict) and isinstance(src.get("url"), str):
        return str(src["url"])
    raise _bad(f"{at}.source: must be a base64 or url image source", f"{at}.source")


def _result_text(content: Any, at: str) -> str:
    return text_only(
        content, "text", at,
        lambda k: _bad(f"{at}.content.{k}: tool results are passed on as text only",
                       f"{at}.content.{k}"),
        lambda: _bad(f"{at}.content: must be a string or an array of text blocks",
                     f"{at}.content"))


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools: must be an array", "tools")
    out = []
    for j, t in enumerate(tools):
        at = f"tools.{j}"
        if not isinstance(t, dict):
            raise _bad(f"{at}: must be an object", at)
        if t.get("type") not in _CLIENT_TOOL_TYPES:
            raise _bad(f"{at}: server tools ({t.get('type')}) are not available here; "
                       "only custom tools with an input_schema", at)
        name, schema = t.get("name"), t.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _bad(f"{at}.name: Field required", f"{at}.name")
        if not isinstance(schema, dict):
            raise _bad(f"{at}.input_schema: Field required", f"{at}.input_schema")
        fn: dict[str, Any] = {"name": name, "parameters": schema}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"  # La Plateforme's translator makes it "any"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice, dict) and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _bad("tool_choice: must be {type: auto|any|none} or {type: tool, name}",
                   "tool_choice")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True \
            and kind != "none":
        out["parallel_tool_calls"] = False


# -- response ------------------------------------------------------------------------

def message_id(chat_id: Any) -> str:
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + _ID_CHARS.sub("", chat_id.removeprefix("chatcmpl-"))[:48]
    return "msg_" + os.urandom(12).hex()


def stop_reason(finish: Any, matched: Any, stops: Iterable[str]) -> tuple[str | None, str | None]:
    """Anthropic's stop_reason and stop_sequence for a chat finish_reason; vLLM names the
    stop string that ended the answer (`stop_reason`), which tells a stop sequence apart
    from the end of a turn."""
    if finish is None:
        return None, None
    if finish == "stop" and isinstance(matched, str) and matched in set(stops):
        return "stop_sequence", matched
    return _STOP_REASON.get(str(finish), "end_turn"), None


def usage_of(usage: Any) -> dict[str, int]:
    u = usage if isinstance(usage, dict) else {}
    p, c = u.get("prompt_tokens"), u.get("completion_tokens")
    return {"input_tokens": p if isinstance(p, int) else 0,
            "output_tokens": c if isinstance(c, int) else 0}


def chat_to_message(data: Mapping[str, Any], model: str,
                    stops: Iterable[str] = ()) -> dict[str, Any]:
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    msg = choice.get("message") if isinstance(choice, dict) else None
    msg = msg if isinstance(msg, dict) else {}
    content: list[dict[str, Any]] = []
    text = msg.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        content.append({"type": "tool_use", "id": str(call.get("id") or _tool_id()),
                        "name": str(fn.get("name") or ""),
                        "input": arguments_object(fn.get("arguments"))})
    reason, sequence = stop_reason(choice.get("finish_reason", "stop"),
                                   choice.get("stop_reason"), stops)
    if reason == "end_turn" and any(b["type"] == "tool_use" for b in content):
        # vLLM ends a named tool_choice with "stop"; a Message that calls a tool says so.
        reason = "tool_use"
    return {"id": message_id(data.get("id")), "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": reason or "end_turn",
            "stop_sequence": sequence, "usage": usage_of(data.get("usage"))}


def _tool_id() -> str:
    return "toolu_" + os.urandom(12).hex()


# -- stream --------------------------------------------------------------------------

def event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass(slots=True)
class MessageStream:
    """Chat completion chunks in, Messages stream events out, one chunk at a time.

    Blocks open as the chunks need them (text, then each tool call) and close when the
    next kind starts; `done()` closes the last and sends message_delta (stop_reason,
    usage) and message_stop. A stream that breaks gets `error()` instead: Anthropic's
    error event, which its SDK raises.
    """

    model: str
    stops: tuple[str, ...] = ()
    started: bool = False
    block: int = -1  # the open block's index, -1 when none is open
    block_kind: str | None = None
    blocks: int = 0
    tools: dict[int, int] = field(default_factory=dict)  # chat tool index -> block index
    finish: Any = None
    matched: Any = None
    usage: dict[str, int] | None = None

    def feed(self, chunk: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if not self.started:
            out.extend(self._start(chunk))
        if isinstance(chunk.get("usage"), dict):
            self.usage = usage_of(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                if isinstance(text, str) and text:
                    if self.block_kind != "text":
                        out.extend(self._open({"type": "text", "text": ""}, "text"))
                    out.append(event("content_block_delta", {
                        "type": "content_block_delta", "index": self.block,
                        "delta": {"type": "text_delta", "text": text}}))
                for call in delta.get("tool_calls") or ():
                    if isinstance(call, dict):
                        out.extend(self._tool(call))
            if choice.get("finish_reason") is not None:
                self.finish = choice["finish_reason"]
                self.matched = choice.get("stop_reason")
        return out

    def _start(self, chunk: Mapping[str, Any]) -> list[bytes]:
        self.started = True
        message: dict[str, Any] = {
            "id": message_id(chunk.get("id")), "type": "message", "role": "assistant",
            "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [event("message_start", {"type": "message_start", "message": message}),
                event("ping", {"type": "ping"})]

    def _close(self) -> list[bytes]:
        if self.block < 0:
            return []
        index, self.block, self.block_kind = self.block, -1, None
        return [event("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _open(self, block: dict[str, Any], kind: str) -> list[bytes]:
        out = self._close()
        self.block, self.block_kind = self.blocks, kind
        self.blocks += 1
        out.append(event("content_block_start", {"type": "content_block_start",
                                                 "index": self.block, "content_block": block}))
        return out

    def _tool(self, call: Mapping[str, Any]) -> list[bytes]:
        n = call.get("index", 0)
        n = n if isinstance(n, int) else 0
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        out: list[bytes] = []
        if n not in self.tools:
            tid = call.get("id")
            out.extend(self._open({"type": "tool_use",
                                   "id": tid if isinstance(tid, str) and tid else _tool_id(),
                                   "name": str(fn.get("name") or ""), "input": {}},
                                  f"tool:{n}"))
            self.tools[n] = self.block
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            out.append(event("content_block_delta", {
                "type": "content_block_delta", "index": self.tools[n],
                "delta": {"type": "input_json_delta", "partial_json": args}}))
        return out

    def done(self) -> list[bytes]:
        out = [] if self.started else self._start({})
        out.extend(self._close())
        reason, sequence = stop_reason(self.finish if self.finish is not None else "stop",
                                       self.matched, self.stops)
        if reason == "end_turn" and self.tools:
            reason = "tool_use"  # as in chat_to_message
        usage = self.usage or {"input_tokens": 0, "output_tokens": 0}
        out.append(event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {"input_tokens": usage["input_tokens"],
                      "output_tokens": usage["output_tokens"]}}))
        out.append(event("message_stop", {"type": "message_stop"}))
        return out

    def error(self, status: int, message: str) -> bytes:
        return event("error", anthropic_error(status, message)[1])


# -- errors --------------------------------------------------------------------------

def anthropic_error(status: int, message: str,
                    request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """Anthropic's status and error body for one of the gateway's: 503 (nothing can
    take the request now) is Anthropic's 529 overloaded_error, other 5xx its api_error."""
    if status == 503:
        status = 529
    kind = _ERROR_TYPES.get(status)
    if kind is None:
        kind = "invalid_request_error" if status < 500 else "api_error"
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return status, body


def error_from_openai(status: int, payload: bytes,
                      request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """An OpenAI-shaped error the gateway rendered, in Anthropic's shape."""
    message: str = f"the gateway answered {status}"
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        message = err["message"]
    return anthropic_error(status, message, request_id)

"""OpenAI's Responses API (stateless) <-> chat completions, as pure functions.

A Responses request becomes a chat completions request before routing, so it takes the
same way as any chat request (aliases, licences, residency, budgets, La Plateforme's
9-character tool-call ids mapped there and back), and the chat answer, whole or streamed,
becomes a Response object again for the caller.

    request_to_chat     Responses request -> chat completions request (validated) + echo
    chat_to_response    chat completion   -> Response object
    ResponseStream      chat chunks       -> Responses stream events

Nothing is stored: `store` is read as false, and what needs a stored response or
conversation (`previous_response_id`, `conversation`, `background`, item references,
stored prompts) is refused with a 400 that says so, as are OpenAI's built-in tools (web
search, file search, computer use...), which nothing here runs. A `call_id` is the chat
tool call's id both ways, so the id mapping of the chat translators holds across turns.
Errors keep OpenAI's shape: the gateway's own renderer serves this surface.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
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
from router.providers.shapes import first_error, integral, text_only

# What only a stateful server can serve: refused, never silently dropped.
_STATEFUL = {
    "previous_response_id": "previous_response_id needs a stored response: this gateway is "
                            "stateless (store is treated as false); send the whole "
                            "conversation in 'input'",
    "conversation": "conversation needs stored state: this gateway is stateless; send the "
                    "whole conversation in 'input'",
    "prompt": "stored prompts are not available here: send the text in 'instructions' "
              "and 'input'",
}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system",
          "developer": "system"}  # La Plateforme and older templates know only 'system'
_INCOMPLETE = {"length": "max_output_tokens", "model_length": "max_output_tokens",
               "content_filter": "content_filter"}
_ID_CHARS = re.compile(r"[^A-Za-z0-9]")


def _bad(message: str, param: str | None = None, code: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


# -- the request's shape -------------------------------------------------------------
# What OpenAI documents for each field (and /openapi.json publishes), checked once per
# request by pydantic-core after the translation below, which words the refusals it
# knows better (state, built-in tools). Strict, as OpenAI's validation is in effect: a
# string is no number, a number no boolean; an integer written as a float (`30.0`) is
# taken, `30.5` refused (router.providers.shapes.integral). An unknown top-level field is
# refused as OpenAI refuses it ("Unknown parameter"); items and parts keep fields of
# their own (`id`, `status` of an output item sent back).

_Int = Annotated[int, BeforeValidator(integral)]
_NonEmpty = Annotated[str, StringConstraints(min_length=1)]
_Name = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _TextPart(_Part):
    type: Literal["input_text", "output_text", "text"]
    text: str


class _Refusal(_Part):
    type: Literal["refusal"]
    refusal: str


class _ImagePart(_Part):
    type: Literal["input_image"]
    image_url: _NonEmpty
    detail: Literal["auto", "low", "high"] = "auto"


_Content = Annotated[_TextPart | _Refusal | _ImagePart, Field(discriminator="type")]


class _Message(_Part):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[_Content]


class _FunctionCall(_Part):
    type: Literal["function_call"]
    call_id: _NonEmpty
    name: _NonEmpty
    arguments: str
    id: str = ""


class _OutputText(_Part):
    type: Literal["input_text"]
    text: str


class _FunctionOutput(_Part):
    type: Literal["function_call_output"]
    call_id: _NonEmpty
    output: str | list[_OutputText]


class _Reasoning(_Part):  # another model's reasoning sent back: skipped
    type: Literal["reasoning"]


def _kind(item: Any) -> Any:
    return item.get("type", "message") if isinstance(item, dict) else None


_InputItem = Annotated[Annotated[_Message, Tag("message")]
                       | Annotated[_FunctionCall, Tag("function_call")]
                       | Annotated[_FunctionOutput, Tag("function_call_output")]
                       | Annotated[_Reasoning, Tag("reasoning")], Discriminator(_kind)]


class _Tool(_Part):
    type: Literal["function"]
    name: _Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _ChoiceFunction(_Part):
    type: Literal["function"]
    name: str


class _PlainFormat(_Part):
    type: Literal["text", "json_object"]


class _SchemaFormat(_Part):
    type: Literal["json_schema"]
    name: _Name
    schema_: Annotated[dict[str, Any], Field(alias="schema")]
    description: str | None = None
    strict: bool | None = None


class _Text(_Part):
    format: Annotated[_PlainFormat | _SchemaFormat, Field(discriminator="type")] = \
        _PlainFormat(type="text")
    verbosity: Literal["low", "medium", "high"] | None = None


class _Create(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: _NonEmpty
    input: str | Annotated[list[_InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _ChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[_Int, Field(ge=1, le=2**63 - 1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    text: _Text | None = None
    stream: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    # Refused with a reason of their own before this (they need state) when set.
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: bool | None = None
    # Documented, changing nothing here: reasoning effort, caching and tiers of OpenAI's
    # own service have no counterpart on an open-weight engine.
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in-memory", "24h"] | None = None
    top_logprobs: Annotated[_Int, Field(ge=0, le=20)] | None = None
    max_tool_calls: Annotated[_Int, Field(ge=1, le=2**63 - 1)] | None = None
    stream_options: dict[str, Any] | None = None


_CREATE = _Create.__pydantic_validator__


def _validate(body: Mapping[str, Any]) -> None:
    """Refuse what the translation let through as OpenAI would: a 400 naming the field
    (param `input[0].content[1].text`), code as OpenAI's (unknown_parameter,
    missing_required_parameter, invalid_type, invalid_value)."""
    try:
        _CREATE.validate_python(body)
    except ValidationError as exc:
        kind, path, msg = first_error(exc, body)
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)[1:]
        if kind == "extra_forbidden":
            raise _bad(f"Unknown parameter: '{param}'.", param, "unknown_parameter") from None
        if kind == "missing":
            raise _bad(f"Missing required parameter: '{param}'.", param,
                       "missing_required_parameter") from None
        if kind.endswith("_type"):
            raise _bad(f"Invalid type for '{param}': {msg}.", param, "invalid_type") from None
        raise _bad(f"Invalid value for '{param}': {msg}.", param or None,
                   "invalid_value") from None


# -- request -------------------------------------------------------------------------

def request_to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """The chat completions request for a Responses request. Raises InvalidRequest for
    what the Responses API would refuse and for what needs state or built-in tools."""
    out = _translate(body)
    _validate(body)
    return out


def _translate(body: Mapping[str, Any]) -> dict[str, Any]:
    for key, why in _STATEFUL.items():
        if body.get(key) is not None:
            raise _bad(why, key, "unsupported_parameter")
    if body.get("background") is True:
        raise _bad("background responses need stored state: this gateway is stateless; "
                   "use stream for long answers", "background", "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("Missing required parameter: 'model'." if model is None
                   else "Invalid type for 'model': expected a string.", "model")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("Invalid type for 'instructions': expected a string.", "instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list) and raw:
        for i, item in enumerate(raw):
            _item(item, i, messages)
    elif raw is None:
        raise _bad("Missing required parameter: 'input'.", "input")
    else:
        raise _bad("Invalid 'input': expected a string or a non-empty array of items.",
                   "input")
    out: dict[str, Any] = {"model": model, "messages": messages}

    tools = body.get("tools")
    if tools is not None:
        out["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        out["tool_choice"] = _tool_choice(choice)
    parallel = body.get("parallel_tool_calls")
    if isinstance(parallel, bool) and tools:
        out["parallel_tool_calls"] = parallel
    max_tokens = integral(body.get("max_output_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _bad("Invalid 'max_output_tokens': expected an integer of at least 1.",
                       "max_output_tokens")
        out["max_tokens"] = max_tokens
    for key, top in (("temperature", 2), ("top_p", 1)):
        v = body.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= top:
                raise _bad(f"Invalid '{key}': expected a number from 0 to {top}.", key)
            out[key] = v
    text = body.get("text")
    if text is not None:
        fmt = _text_format(text)
        if fmt is not None:
            out["response_format"] = fmt
    user = body.get("user", body.get("safety_identifier"))
    if isinstance(user, str) and user:
        out["user"] = user  # the end-user field; La Plateforme's translator drops it
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("Invalid type for 'stream': expected a boolean.", "stream")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # the usage of response.completed
    return out


def _item(item: Any, i: int, messages: list[dict[str, Any]]) -> None:
    at = f"input[{i}]"
    if not isinstance(item, dict):
        raise _bad(f"Invalid '{at}': expected an object.", at)
    kind = item.get("type", "message")
    if kind == "message":
        messages.append(_message(item, at))
    elif kind == "function_call":
        call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
        if not (isinstance(call_id, str) and call_id and isinstance(name, str) and name):
            raise _bad(f"Invalid '{at}': a function_call needs a string call_id and name.",
                       at)
        if not isinstance(args, str):
            raise _bad(f"Invalid '{at}.arguments': expected a string.", f"{at}.arguments")
        call = {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": args}}
        last = messages[-1] if messages else None
        # Parallel calls come as consecutive items; chat wants them on one assistant turn.
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
            if last.get("content") == "":
                last["content"] = None
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or not call_id:
            raise _bad(f"Invalid '{at}.call_id': expected a string.", f"{at}.call_id")
        messages.append({"role": "tool", "tool_call_id": call_id,
                         "content": _output_text(output, f"{at}.output")})
    elif kind == "reasoning":
        return  # another model's reasoning: nothing an open-weight model reads back
    elif kind == "item_reference":
        raise _bad(f"Invalid '{at}': item references need stored items; this gateway is "
                   "stateless, send the items themselves", at, "unsupported_parameter")
    else:
        raise _bad(f"Invalid '{at}': {kind!s} items belong to built-in tools, which are not "
                   "available here; only message, function_call and function_call_output",
                   at, "unsupported_parameter")


def _message(item: dict[str, Any], at: str) -> dict[str, Any]:
    raw_role = item.get("role")
    role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        raise _bad(f"Invalid '{at}.role': expected user, assistant, system or developer.",
                   f"{at}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _bad(f"Invalid '{at}.content': expected a string or an array of parts.",
                   f"{at}.content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{at}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and role == "user":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise _bad(f"Invalid '{where}': input_image needs an image_url (a URL or a "
                           "data URL); file ids need stored files", where)
            image: dict[str, Any] = {"url": url}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise _bad(f"Invalid '{where}': expected input_text, input_image (user) or "
                       "output_text (assistant)", where)
    if all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _output_text(output: Any, at: str) -> str:
    return text_only(
        output, "input_text", at,
        lambda k: _bad(f"Invalid '{at}[{k}]': tool outputs are passed on as text only",
                       f"{at}[{k}]"),
        lambda: _bad(f"Invalid '{at}': expected a string.", at))


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("Invalid 'tools': expected an array.", "tools")
    out = []
    for j, t in enumerate(tools):
        at = f"tools[{j}]"
        if not isinstance(t, dict):
            raise _bad(f"Invalid '{at}': expected an object.", at)
        kind = t.get("type")
        if kind != "function":
            raise _bad(f"Invalid '{at}': built-in tools ({kind!s}) are not available here; "
                       "this gateway serves function tools only", at, "unsupported_tool")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"Missing required parameter: '{at}.name'.", f"{at}.name")
        fn: dict[str, Any] = {"name": name}
        params = t.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise _bad(f"Invalid '{at}.parameters': expected an object.",
                           f"{at}.parameters")
            fn["parameters"] = params
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        if isinstance(t.get("strict"), bool):
            fn["strict"] = t["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice, dict) and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind is not None:
        raise _bad(f"Invalid 'tool_choice': {kind!s} is not available here; use auto, none, "
                   "required or {type: function, name}", "tool_choice", "unsupported_tool")
    raise _bad("Invalid 'tool_choice': expected auto, none, required or "
               "{type: function, name}", "tool_choice")


def _text_format(text: Any) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or (fmt is not None and not isinstance(fmt, dict)):
        raise _bad("Invalid 'text': expected {format: {type: ...}}.", "text")
    kind = fmt.get("type") if fmt else "text"
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and fmt is not None:
        name, schema = fmt.get("name"), fmt.get("schema")
        if not isinstance(name, str) or not name:
            raise _bad("Missing required parameter: 'text.format.name'.", "text.format.name")
        if not isinstance(schema, dict):
            raise _bad("Missing required parameter: 'text.format.schema'.",
                       "text.format.schema")
        spec: dict[str, Any] = {"name": name, "schema": schema}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                spec[key] = fmt[key]
        return {"type": "json_schema", "json_schema": spec}
    raise _bad("Invalid 'text.format.type': expected text, json_object or json_schema.",
               "text.format.type")


def echo(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's settings a Response object repeats back (OpenAI echoes them)."""
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    tools = body.get("tools")
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "temperature": body.get("temperature"),
        "text": {"format": fmt if isinstance(fmt, dict) else {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": tools if isinstance(tools, list) else [],
        "top_p": body.get("top_p"),
        "user": body.get("user"),
    }


# -- response ------------------------------------------------------------------------

def _suffix(chat_id: Any) -> str:
    if isinstance(chat_id, str):
        s = _ID_CHARS.sub("", chat_id.removeprefix("chatcmpl-"))[:48]
        if s:
            return s
    return os.urandom(12).hex()


def usage_of(usage: Any) -> dict[str, Any]:
    u = usage if isinstance(usage, dict) else {}
    p, c = u.get("prompt_tokens"), u.get("completion_tokens")
    p = p if isinstance(p, int) else 0
    c = c if isinstance(c, int) else 0
    details = u.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return {"input_tokens": p,
            "input_tokens_details": {"cached_tokens": cached if isinstance(cached, int) else 0},
            "output_tokens": c, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + c}


def _envelope(rid: str, model: str, settings: Mapping[str, Any], created: int,
              status: str) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "error": None, "incomplete_details": None, "model": model, "output": [],
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": False, "truncation": "disabled", "usage": None, **settings}


def _finish(resp: dict[str, Any], finish: Any, usage: Any) -> dict[str, Any]:
    reason = _INCOMPLETE.get(str(finish))
    if reason is not None:
        resp["status"] = "incomplete"
        resp["incomplete_details"] = {"reason": reason}
    else:
        resp["status"] = "completed"
    resp["usage"] = usage_of(usage)
    return resp


def _text_item(iid: str, text: str, status: str) -> dict[str, Any]:
    return {"id": iid, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}] if status != "in_progress" else []}


def _call_item(iid: str, call_id: str, name: str, args: str, status: str) -> dict[str, Any]:
    return {"id": iid, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": args, "status": status}


def _call_id() -> str:
    return "call_" + os.urandom(12).hex()


def chat_to_response(data: Mapping[str, Any], model: str, settings: Mapping[str, Any],
                     created: int | None = None) -> dict[str, Any]:
    """The Response object for a chat completion; `settings` is `echo(request)`."""
    suffix = _suffix(data.get("id"))
    resp = _envelope("resp_" + suffix, model, settings,
                     created if created is not None else int(time.time()), "completed")
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    msg = choice.get("message") if isinstance(choice, dict) else None
    msg = msg if isinstance(msg, dict) else {}
    output: list[dict[str, Any]] = []
    text = msg.get("content")
    if isinstance(text, str) and text:
        output.append(_text_item("msg_" + suffix, text, "completed"))
    for n, call in enumerate(msg.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments")
        output.append(_call_item(f"fc_{suffix}_{n}", str(call.get("id") or _call_id()),
                                 str(fn.get("name") or ""),
                                 args if isinstance(args, str) else orjson.dumps(args or {})
                                 .decode(), "completed"))
    resp["output"] = output
    finish = choice.get("finish_reason", "stop") if isinstance(choice, dict) else "stop"
    return _finish(resp, finish, data.get("usage"))


# -- stream --------------------------------------------------------------------------

@dataclass(slots=True)
class _Item:
    index: int
    item: dict[str, Any]
    text: list[str] = field(default_factory=list)  # text deltas, or argument deltas


@dataclass(slots=True)
class ResponseStream:
    """Chat completion chunks in, Responses stream events out, one chunk at a time.

    response.created and response.in_progress open the stream; an output item opens as
    the chunks need it (a message for text, a function_call per tool call) with its
    content part, deltas follow, and it closes (…done events) when the next item starts.
    `done()` closes the last one and sends response.completed (or response.incomplete
    when max_output_tokens ended the answer) with usage. A stream that breaks gets
    `error()`: an error event and response.failed, which OpenAI's SDK reports.
    """

    model: str
    settings: Mapping[str, Any]
    created: int = 0
    seq: int = 0
    started: bool = False
    response: dict[str, Any] = field(default_factory=dict)
    items: list[_Item] = field(default_factory=list)
    open: _Item | None = None
    tools: dict[int, _Item] = field(default_factory=dict)  # chat tool index -> item
    finish: Any = None
    usage: Any = None

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": [i.item for i in self.items
                                            if i.item["status"] != "in_progress"]}

    def _start(self, chunk: Mapping[str, Any]) -> list[bytes]:
        self.started = True
        suffix = _suffix(chunk.get("id"))
        self.response = _envelope("resp_" + suffix, self.model, self.settings,
                                  self.created or int(time.time()), "in_progress")
        return [self._event("response.created", {"response": self._snapshot()}),
                self._event("response.in_progress", {"response": self._snapshot()})]

    def feed(self, chunk: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if not self.started:
            out.extend(self._start(chunk))
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                if isinstance(text, str) and text:
                    out.extend(self._text(text))
                for call in delta.get("tool_calls") or ():
                    if isinstance(call, dict):
                        out.extend(self._tool(call))
            if choice.get("finish_reason") is not None:
                self.finish = choice["finish_reason"]
        return out

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.response['id'].removeprefix('resp_')}_{len(self.items)}"

    def _add(self, item: dict[str, Any]) -> tuple[_Item, bytes]:
        it = _Item(len(self.items), item)
        self.items.append(it)
        self.open = it
        return it, self._event("response.output_item.added",
                               {"output_index": it.index, "item": dict(item)})

    def _text(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        it = self.open
        if it is None or it.item["type"] != "message":
            out.extend(self._close())
            it, added = self._add(_text_item(self._item_id("msg"), "", "in_progress"))
            out.append(added)
            out.append(self._event("response.content_part.added", {
                "item_id": it.item["id"], "output_index": it.index, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}))
        it.text.append(text)
        out.append(self._event("response.output_text.delta", {
            "item_id": it.item["id"], "output_index": it.index, "content_index": 0,
            "delta": text, "logprobs": []}))
        return out

    def _tool(self, call: Mapping[str, Any]) -> list[bytes]:
        n = call.get("index", 0)
        n = n if isinstance(n, int) else 0
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        out: list[bytes] = []
        it = self.tools.get(n)
        if it is None:
            out.extend(self._close())
            cid = call.get("id")
            it, added = self._add(_call_item(
                self._item_id("fc"), cid if isinstance(cid, str) and cid else _call_id(),
                str(fn.get("name") or ""), "", "in_progress"))
            self.tools[n] = it
            out.append(added)
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            it.text.append(args)
            out.append(self._event("response.function_call_arguments.delta", {
                "item_id": it.item["id"], "output_index": it.index, "delta": args}))
        return out

    def _close(self) -> list[bytes]:
        it, self.open = self.open, None
        if it is None:
            return []
        whole = "".join(it.text)
        base = {"item_id": it.item["id"], "output_index": it.index}
        out: list[bytes] = []
        if it.item["type"] == "message":
            part = {"type": "output_text", "text": whole, "annotations": [], "logprobs": []}
            it.item = _text_item(it.item["id"], whole, "completed")
            out.append(self._event("response.output_text.done",
                                   {**base, "content_index": 0, "text": whole,
                                    "logprobs": []}))
            out.append(self._event("response.content_part.done",
                                   {**base, "content_index": 0, "part": part}))
        else:
            it.item = {**it.item, "arguments": whole, "status": "completed"}
            out.append(self._event("response.function_call_arguments.done",
                                   {**base, "arguments": whole}))
        out.append(self._event("response.output_item.done",
                               {"output_index": it.index, "item": it.item}))
        return out

    def done(self) -> list[bytes]:
        out = [] if self.started else self._start({})
        out.extend(self._close())
        resp = _finish(self._snapshot(), self.finish if self.finish is not None else "stop",
                       self.usage)
        kind = "response.completed" if resp["status"] == "completed" else \
            "response.incomplete"
        out.append(self._event(kind, {"response": resp}))
        return out

    def error(self, code: str, message: str) -> list[bytes]:
        """The stream broke after its start (the upstream failed, the deadline passed): an
        error event, then response.failed with what was complete so far."""
        out = [] if self.started else self._start({})
        out.append(self._event("error", {"code": code, "message": message, "param": None}))
        resp = {**self._snapshot(), "status": "failed",
                "error": {"code": code, "message": message}}
        if self.usage is not None:
            resp["usage"] = usage_of(self.usage)
        out.append(self._event("response.failed", {"response": resp}))
        return out

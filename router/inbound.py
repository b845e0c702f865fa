"""The request as routing sees it: bounded body, one JSON parse, only the fields it needs.

Messages are never validated or rebuilt one by one: the upstream validates them, and
re-serialising every message is what makes Python gateways slow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.types import Receive

from router.config import Endpoint
from router.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from router.policy import Force, RequestFacts

_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_FORCE: dict[str, Force] = {"local": "local", "hosted": "hosted", "auto": "auto"}
# vLLM bounds `seed` to 64-bit signed integers; counts get the same ceiling.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Past 2**53 a float no longer spells one integer (and orjson reads any integer literal
# beyond 64 bits as a float): such a number is not taken as an integer.
_EXACT_FLOAT = 2**53
_MAX_DEPTH = 254  # the deepest nesting orjson writes


async def read_json(receive: Receive, limit: int,
                    headers: Mapping[str, str]) -> dict[str, Any]:
    if not _is_json(headers.get("content-type", "")):
        raise UnsupportedMediaType("the request body must be JSON, sent with "
                                   "'Content-Type: application/json'")
    declared = headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise InvalidRequest("Content-Length is not a number") from None
        if too_big:
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # Nobody reads the answer; this keeps a hang-up out of the 500s and the log.
            raise InvalidRequest("the client went away before the request body ended",
                                 code="client_disconnected")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not raw:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    # orjson reads 1024 levels but writes 254: what cannot go upstream is refused here.
    # Only a body with that many brackets can be that deep, and counting is cheap.
    if raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH:
        try:
            orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise InvalidRequest("the request body is nested too deeply") from None
    return body


def _is_json(content_type: str) -> bool:
    """No Content-Type is taken as JSON; any other type must say JSON."""
    media = content_type.partition(";")[0].strip().lower()
    return not media or media == "application/json" or (
        media.startswith("application/") and media.endswith("+json"))


def facts_for(endpoint: Endpoint, body: dict[str, Any], headers: Mapping[str, str]) -> RequestFacts:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model",
                             code="missing_required_parameter" if model is None else None)
    stream = _bool(body, "stream")
    # Embeddings generate nothing: sampling fields there are unknown ones, passed on as is.
    max_tokens = None if endpoint == "embeddings" else _check_sampling(body)

    if endpoint == "chat":
        prompt_chars = _check_messages(body.get("messages"))
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise InvalidRequest("'tools' must be an array", param="tools")
            prompt_chars += len(orjson.dumps(tools))
    elif endpoint == "embeddings":
        prompt_chars = _text_size(body.get("input"), "input")
    else:
        prompt_chars = _text_size(body.get("prompt"), "prompt")
        suffix = body.get("suffix")
        if suffix is not None:
            if not isinstance(suffix, str):
                raise InvalidRequest("'suffix' must be a string", param="suffix")
            if suffix:
                endpoint = "fim"
                prompt_chars += len(suffix)

    force = _FORCE.get(headers.get("x-spillover-route", "auto").strip().lower())
    if force is None:
        raise InvalidRequest("x-spillover-route must be one of local, hosted, auto",
                             param="x-spillover-route")
    residency = headers.get("x-spillover-residency", "").strip().lower()
    if residency not in ("", "onprem", "any"):
        raise InvalidRequest("x-spillover-residency must be 'onprem' or 'any'",
                             param="x-spillover-residency")
    return RequestFacts(
        alias=model,
        endpoint=endpoint,
        stream=stream,
        max_tokens=max_tokens,
        # About four characters a token for Mistral's tokenizers on English text.
        prompt_tokens=prompt_chars // 4 + 1,
        force=force,
        onprem_only=residency == "onprem",
    )


def _check_sampling(body: dict[str, Any]) -> int | None:
    """The generation fields routing reads or the gateway rewrites; the max tokens."""
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict)
                                 and isinstance(opts.get("include_usage", False), bool)):
        raise InvalidRequest("'stream_options' must be an object; its include_usage a boolean",
                             param="stream_options")
    max_tokens = _int(body, "max_tokens")
    mct = _int(body, "max_completion_tokens")
    _int(body, "n")
    _int(body, "seed", _INT64_MIN)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise InvalidRequest(f"'{key}' must be a number", param=key)
    return mct if max_tokens is None else max_tokens


def _bool(body: dict[str, Any], key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InvalidRequest(f"'{key}' must be a boolean", param=key)
    return v


def _int(body: dict[str, Any], key: str, lo: int = 1, hi: int = _INT64_MAX) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer() and abs(v) <= _EXACT_FLOAT:
        v = body[key] = int(v)  # JSON's 2.0 is the integer 2; sent on as 2
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidRequest(f"'{key}' must be an integer from {lo} to {hi}", param=key)
    return v


def _check_messages(messages: Any) -> int:
    if messages is None:
        raise InvalidRequest("'messages' is a required property", param="messages",
                             code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    chars = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}",
                param=f"messages[{i}].role",
            )
        content = msg.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
        elif content is not None:
            raise InvalidRequest(f"messages[{i}].content must be a string or an array",
                                 param=f"messages[{i}].content")
    return chars


def _text_size(value: Any, key: str) -> int:
    if value is None:
        raise InvalidRequest(f"'{key}' is a required property", param=key,
                             code="missing_required_parameter")
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list) and value:
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                total += 4  # a token id (the upstream checks it is one)
            elif isinstance(item, list):
                total += 4 * len(item)
            else:
                raise InvalidRequest(f"'{key}' must be a string or an array of strings",
                                     param=key)
        return total
    raise InvalidRequest(f"'{key}' must be a string or a non-empty array", param=key)

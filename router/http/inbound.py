"""The request as routing sees it: bounded body, one JSON parse, only the fields it needs.

Messages are never validated or rebuilt one by one: the upstream validates them, and
re-serialising every message is what makes Python gateways slow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.types import Receive

from router.config import PRIORITIES, Endpoint, Priority
from router.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from router.routing.policy import Force, RequestFacts

_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_FORCE: dict[str, Force] = {"local": "local", "hosted": "hosted", "auto": "auto"}
# vLLM bounds `seed` to 64-bit signed integers; counts get the same ceiling.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Past 2**53 a float no longer spells one integer (and orjson reads any integer literal
# beyond 64 bits as a float): such a number is not taken as an integer.
_EXACT_FLOAT = 2**53
_MAX_DEPTH = 254  # the deepest nesting orjson writes
# A session id: what UUIDs, ULIDs and base64 tokens are spelled with, bounded.
_SESSION = re.compile(r"[A-Za-z0-9._:/+=\-]{1,128}")

# The prompt's upper bound. Mistral's tokenizers (SentencePiece with byte fallback, and the
# byte-level Tekken) never spend more than one token on a byte of UTF-8 text; what they add
# on top is control tokens ([INST], BOS, EOS, [TOOL_CALLS], ...), the "\n\n" joining a system
# prompt and a word-start marker per piece of text encoded apart. Those are the overheads.
_REQUEST_OVERHEAD = 8
_MESSAGE_OVERHEAD = 8
_PART_OVERHEAD = 3
# A non-text part (an image): Mistral's vision encoder takes at most 1024x1024 pixels in
# 16-pixel patches, 64 x 64 tokens plus one row break per row.
_NON_TEXT_PART_TOKENS = 64 * 65


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
    max_tokens, choices = (None, 1) if endpoint == "embeddings" else _check_sampling(body)

    if endpoint == "chat":
        prompt_chars, bound = _check_messages(body.get("messages"))
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise InvalidRequest("'tools' must be an array", param="tools")
            encoded = orjson.dumps(tools)
            prompt_chars += len(encoded)
            bound += _json_tokens(encoded)
        for key in ("response_format", "tool_choice"):
            extra = body.get(key)
            if isinstance(extra, dict):
                bound += _json_tokens(orjson.dumps(extra))
    elif endpoint == "embeddings":
        prompt_chars, bound = _text_size(body.get("input"), "input")
    else:
        prompt_chars, bound = _text_size(body.get("prompt"), "prompt")
        suffix = body.get("suffix")
        if suffix is not None:
            if not isinstance(suffix, str):
                raise InvalidRequest("'suffix' must be a string", param="suffix")
            if suffix:
                endpoint = "fim"
                prompt_chars += len(suffix)
                bound += _PART_OVERHEAD + _utf8_len(suffix)

    # Repeated policy headers arrive joined with commas (gateway.header_map). Residency:
    # the strictest wins (onprem). A forced route has no strictest value: two different
    # ones are refused rather than one picked.
    routes = _header_values(headers, "x-spillover-route")
    if any(v not in _FORCE for v in routes):
        raise InvalidRequest("x-spillover-route must be one of local, hosted, auto",
                             param="x-spillover-route")
    if len(set(routes)) > 1:
        raise InvalidRequest("x-spillover-route was sent more than once with different "
                             "values; send it once", param="x-spillover-route",
                             code="conflicting_headers")
    force = _FORCE[routes[0]] if routes else "auto"
    residency = _header_values(headers, "x-spillover-residency")
    if any(v not in ("onprem", "any") for v in residency):
        raise InvalidRequest("x-spillover-residency must be 'onprem' or 'any'",
                             param="x-spillover-residency")
    return RequestFacts(
        alias=model,
        endpoint=endpoint,
        stream=stream,
        max_tokens=max_tokens,
        # About four characters a token for Mistral's tokenizers on English text.
        prompt_tokens=prompt_chars // 4 + 1,
        prompt_tokens_max=_REQUEST_OVERHEAD + bound,
        choices=choices,
        force=force,
        onprem_only="onprem" in residency,
    )


def priority_header(headers: Mapping[str, str]) -> Priority | None:
    """The class x-spillover-priority asks for, None when it is not sent. Sent more than
    once (a proxy adding its own), the lowest class wins: lowering is always allowed, so
    no hop can raise what another lowered."""
    asked = _header_values(headers, "x-spillover-priority")
    if any(v not in PRIORITIES for v in asked):
        raise InvalidRequest("x-spillover-priority must be one of "
                             f"{', '.join(PRIORITIES)}", param="x-spillover-priority")
    named = [p for p in PRIORITIES if p in asked]
    return named[-1] if named else None


def session_header(headers: Mapping[str, str]) -> str | None:
    """The caller's conversation id from x-spillover-session (kept on one engine replica
    while it has room), None when not sent. Case counts; sent more than once with
    different values, it is refused rather than one picked."""
    raw = headers.get("x-spillover-session")
    if raw is None:
        return None
    values = {v for part in raw.split(",") if (v := part.strip())}
    if len(values) > 1:
        raise InvalidRequest("x-spillover-session was sent more than once with different "
                             "values; send it once", param="x-spillover-session",
                             code="conflicting_headers")
    if not values:
        return None
    (session,) = values
    if not _SESSION.fullmatch(session):
        # The value is not echoed: it may be anything, a secret pasted by mistake included.
        raise InvalidRequest("x-spillover-session must be 1 to 128 characters of letters, "
                             "digits and . _ : / + = -", param="x-spillover-session",
                             code="invalid_session")
    return session


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """The comma-separated values of a header, lower-cased; empty ones (a bare header)
    mean nothing was said."""
    raw = headers.get(name)
    if raw is None:
        return []
    return [v for part in raw.split(",") if (v := part.strip().lower())]


def _check_sampling(body: dict[str, Any]) -> tuple[int | None, int]:
    """The generation fields routing reads or the gateway rewrites; the max tokens and how
    many answers of that length the upstream may generate (`n`, `best_of`)."""
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict)
                                 and isinstance(opts.get("include_usage", False), bool)):
        raise InvalidRequest("'stream_options' must be an object; its include_usage a boolean",
                             param="stream_options")
    max_tokens = _int(body, "max_tokens")
    mct = _int(body, "max_completion_tokens")
    n = _int(body, "n") or 1
    best_of = _int(body, "best_of") or 1
    _int(body, "seed", _INT64_MIN)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise InvalidRequest(f"'{key}' must be a number", param=key)
    return (mct if max_tokens is None else max_tokens), max(n, best_of)


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


def _check_messages(messages: Any) -> tuple[int, int]:
    """The prompt's characters (the estimate) and its upper bound in tokens."""
    if messages is None:
        raise InvalidRequest("'messages' is a required property", param="messages",
                             code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    chars = bound = 0
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
        # Tool results and tool calls reach the model as JSON (quotes and line breaks
        # escaped): the whole message, JSON-encoded, bounds them.
        as_json = role == "tool" or msg.get("tool_calls") is not None
        bound += _MESSAGE_OVERHEAD
        if as_json:
            bound += _json_tokens(orjson.dumps(msg))
        if isinstance(content, str):
            chars += len(content)
            if not as_json:
                bound += _utf8_len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
                    if not as_json:
                        bound += _PART_OVERHEAD + _utf8_len(part["text"])
                else:
                    bound += _NON_TEXT_PART_TOKENS
        elif content is not None:
            raise InvalidRequest(f"messages[{i}].content must be a string or an array",
                                 param=f"messages[{i}].content")
    return chars, bound


def _utf8_len(text: str) -> int:
    # isascii() reads a flag CPython keeps on every string: no pass over the text.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json_tokens(encoded: bytes) -> int:
    """A bound on the tokens of JSON as a chat template may render it: with a space after
    every ',' and ':' (Python's json.dumps), and non-ASCII text possibly escaped to
    \\uXXXX, at most three times its UTF-8 bytes."""
    size = len(encoded) if encoded.isascii() else 3 * len(encoded)
    return size + encoded.count(b",") + encoded.count(b":")


def _text_size(value: Any, key: str) -> tuple[int, int]:
    """The characters of a prompt or input (the estimate) and its upper bound in tokens."""
    if value is None:
        raise InvalidRequest(f"'{key}' is a required property", param=key,
                             code="missing_required_parameter")
    if isinstance(value, str):
        return len(value), _PART_OVERHEAD + _utf8_len(value)
    if isinstance(value, list) and value:
        total = bound = 0
        for item in value:
            if isinstance(item, str):
                total += len(item)
                bound += _PART_OVERHEAD + _utf8_len(item)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                total += 4  # a token id (the upstream checks it is one)
                bound += 1
            elif isinstance(item, list):
                total += 4 * len(item)
                bound += _PART_OVERHEAD + len(item)
            else:
                raise InvalidRequest(f"'{key}' must be a string or an array of strings",
                                     param=key)
        return total, bound
    raise InvalidRequest(f"'{key}' must be a string or a non-empty array", param=key)

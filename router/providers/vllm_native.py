"""A local vLLM engine's own Messages and Responses endpoints: what is sent there, when.

vLLM serves `POST /v1/messages` (Anthropic's shape) and `POST /v1/responses` itself, and
turns them into its chat path inside the engine. A caller's Messages or Responses request
routed to an engine that serves its API (router.routing.engine_apis) goes there as the
caller wrote it, less what the translation would drop too, so both ways answer the same
request; what the native endpoint would mishandle stays translated to chat completions:

- Messages with a tool result marked `is_error` (vLLM drops the flag; the translation
  says "Error: ..."), with image, document or thinking blocks (the translation's own
  refusals and drops then apply), or whose class must be carried to a priority-scheduled
  engine other than as its default: vLLM's Messages request has no `priority` field
  (it is ignored there) and its default 0 is the interactive class's.
- Responses with tools or function-call items: measured with vLLM 0.32 on the demo model
  (mistral tool parser, xgrammar), `/v1/responses` with tool_choice
  `{type: function, name: get_weather}` generated 96 tokens of text and no function call,
  where chat completions with the same tool_choice returns the call. Also image input
  (the translation's own checks apply, as for Messages images).

Tool-use ids reach the engine as Mistral's 9-character ids (Mistral chat templates refuse
others: measured, vLLM answers 400 "Tool call ids must be exactly 9 characters"), mapped
by the same stable hash as the chat path (router.providers.tool_ids), so a conversation
that moves between the native path, the translated one and La Plateforme keeps its ids;
vLLM's own new tool_use ids are already 9 characters.

Usage for the ledger: a Message's `usage` (input_tokens, output_tokens), in a stream
message_start (input) then message_delta (both); a Response's `usage`, in a stream the
`response` of its terminal event (response.completed, .incomplete, .failed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.providers.base import Prepared
from router.providers.tool_ids import IdMap, mistral_tool_id

MESSAGES_NATIVE = "anthropic-native"  # same as anthropic_upstream.NATIVE: the same events
RESPONSES_NATIVE = "responses-native"

# What the translations read; anything else the caller sent is left out of the native
# body too (the translation drops it), so both ways answer the same request.
_MESSAGES_FIELDS = ("model", "messages", "system", "max_tokens", "tools", "tool_choice",
                    "stop_sequences", "temperature", "top_p", "top_k", "metadata", "stream")
_RESPONSES_FIELDS = ("model", "input", "instructions", "max_output_tokens", "temperature",
                     "top_p", "text", "stream", "metadata", "user")
_NATIVE_BLOCKS = frozenset({"text", "tool_use", "tool_result"})
_TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")


def messages_unsuited(body: Mapping[str, Any]) -> str | None:
    """Why this (validated) Messages request stays translated; None when it may go native."""
    system = body.get("system")
    if isinstance(system, list) and any(
            not (isinstance(b, dict) and b.get("type") == "text") for b in system):
        return "system blocks other than text"
    for msg in body.get("messages") or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in _NATIVE_BLOCKS:
                return f"{kind} blocks"
            if kind == "tool_result" and block.get("is_error") is True:
                return "a tool_result with is_error"
    return None


def responses_unsuited(body: Mapping[str, Any]) -> str | None:
    """Why this (validated) Responses request stays translated; None when it may go native."""
    if body.get("tools") or body.get("tool_choice") not in (None, "auto", "none"):
        return "tools (vLLM 0.32's /v1/responses did not follow tool_choice)"
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text", "json_schema",
                                                         "json_object"):
        return f"text.format {fmt.get('type')}"
    raw = body.get("input")
    if isinstance(raw, list):
        for item in raw:
            if not isinstance(item, dict) or item.get("type", "message") != "message":
                return "input items other than messages"
            content = item.get("content")
            if isinstance(content, list) and any(
                    not isinstance(p, dict)
                    or p.get("type") not in ("input_text", "output_text", "text")
                    for p in content):
                return "message parts other than text"
    return None


def messages_request(body: Mapping[str, Any], model_id: str) -> Prepared:
    """The engine's /v1/messages request for a caller's Messages request."""
    out: dict[str, Any] = {k: body[k] for k in _MESSAGES_FIELDS if k in body}
    out["model"] = model_id
    ids = IdMap()
    messages = out.get("messages")
    if isinstance(messages, list):
        out["messages"] = [_with_mistral_ids(m, ids) for m in messages]
    return Prepared("/messages", out, ids, MESSAGES_NATIVE)


def responses_request(body: Mapping[str, Any], model_id: str,
                      priority: int | None) -> Prepared:
    """The engine's /v1/responses request for a caller's Responses request: stateless
    (store false), with the class's vLLM priority for a priority-scheduled engine."""
    out: dict[str, Any] = {k: body[k] for k in _RESPONSES_FIELDS if k in body}
    out["model"] = model_id
    out["store"] = False
    if priority is not None:
        out["priority"] = priority
    return Prepared("/responses", out, IdMap(), RESPONSES_NATIVE)


def _with_mistral_ids(msg: Any, ids: IdMap) -> Any:
    content = msg.get("content") if isinstance(msg, dict) else None
    if not isinstance(content, list):
        return msg
    blocks = []
    for block in content:
        if isinstance(block, dict):
            for key in ("id", "tool_use_id"):
                old = block.get(key)
                if block.get("type") in ("tool_use", "tool_result") and isinstance(old, str):
                    new = mistral_tool_id(old)
                    if new != old:
                        ids.back[new] = old
                        block = {**block, key: new}
        blocks.append(block)
    return {**msg, "content": blocks}


def responses_usage(data: Mapping[str, Any]) -> dict[str, int] | None:
    """The chat-shaped usage of a Response object or of a stream's terminal event."""
    resp = data.get("response") if "response" in data else data
    usage = resp.get("usage") if isinstance(resp, Mapping) else None
    if not isinstance(usage, Mapping):
        return None
    p, c = usage.get("input_tokens"), usage.get("output_tokens")
    if not isinstance(p, int) or not isinstance(c, int):
        return None
    return {"prompt_tokens": p, "completion_tokens": c}


def is_terminal(event: bytes) -> bool:
    """A Responses stream's last event (the one carrying usage)."""
    return event.startswith(b"event: ") and event[7:].split(b"\n", 1)[0].strip() in _TERMINAL



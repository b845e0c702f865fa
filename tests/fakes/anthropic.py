"""A fake Anthropic Messages API (https://api.anthropic.com/v1/messages) that validates
requests the way Anthropic documents and answers them.

Rules imitated (Anthropic's API reference for Messages, and its error messages as quoted
in public issues, e.g. anthropics/claude-code#8210, #6575):

- ``x-api-key`` must be the key (401 authentication_error "invalid x-api-key");
  ``anthropic-version`` is required (400).
- ``model``, ``max_tokens`` (integer >= 1) and ``messages`` are required; unknown top-level
  fields are refused ("Extra inputs are not permitted"); ``temperature`` is 0 to 1.
- ``system`` is a top-level field: a message with role "system" is refused.
- Roles are "user" and "assistant", alternating, the first one "user".
- Content is a string or blocks: user turns take text, image, document and tool_result;
  assistant turns take text, tool_use (and thinking). Text blocks must not be empty.
- Every ``tool_use`` needs a ``tool_result`` with its id in the next (user) message, and
  every ``tool_result`` a ``tool_use`` with its id in the previous message; tool results
  come first in their message. Tool use ids match ``^[a-zA-Z0-9_-]+$``.
- Tools need a name (``^[a-zA-Z0-9_-]{1,64}$``) and an ``input_schema``; ``tool_choice`` is
  auto | any | none | tool (with a name).
- Errors are ``{"type": "error", "error": {"type", "message"}, "request_id"}``; an overload
  is 529 ``overloaded_error``.

Answers are deterministic: a text ("claude answer") or, when tools are offered and the last
turn is not a tool result, a tool_use of the first tool. Streams send the documented event
sequence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_API_KEY = "test-anthropic-key"
_TOP = frozenset({"model", "messages", "max_tokens", "system", "metadata", "stop_sequences",
                  "stream", "temperature", "top_p", "top_k", "tools", "tool_choice",
                  "thinking", "service_tier"})
_USER_BLOCKS = frozenset({"text", "image", "document", "tool_result"})
_ASSISTANT_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking"})
_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 429: "rate_limit_error", 500: "api_error",
                529: "overloaded_error"}


class Invalid(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass
class FakeAnthropic:
    api_key: str = DEFAULT_API_KEY
    text: str = "claude answer"
    usage: tuple[int, int] = (12, 7)
    faults: list[int] = field(default_factory=list)  # statuses to answer, next first
    cut_stream: bool = False  # end a stream after its first text delta, no message_stop
    requests: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # messages of the 400s it answered

    def handle(self, req: httpx.Request) -> httpx.Response:
        try:
            body = json.loads(req.content)
        except ValueError:
            body = None
        self.requests.append((dict(req.headers), body))
        try:
            if req.headers.get("x-api-key") != self.api_key:
                raise Invalid("invalid x-api-key", 401)
            if not req.headers.get("anthropic-version"):
                raise Invalid("anthropic-version: header is required")
            if req.url.path != "/v1/messages":
                raise Invalid(f"Not found: {req.url.path}", 404)
            if self.faults:
                status = self.faults.pop(0)
                raise Invalid("Overloaded" if status == 529 else f"fault {status}", status)
            validate(body)
        except Invalid as exc:
            if exc.status == 400:
                self.refused.append(exc.message)
            return error(exc.status, exc.message)
        message = self._message(body)
        if body.get("stream") is True:
            return httpx.Response(200, content=self._events(message),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=message, headers={"request-id": "req_fake"})

    def _message(self, body: Mapping[str, Any]) -> dict[str, Any]:
        last = body["messages"][-1]
        last_is_result = isinstance(last["content"], list) and any(
            b.get("type") == "tool_result" for b in last["content"])
        choice = body.get("tool_choice") or {}
        content: list[dict[str, Any]]
        if body.get("tools") and not last_is_result and choice.get("type") != "none":
            tool = body["tools"][0]
            content = [{"type": "tool_use", "id": f"toolu_{len(self.requests):04d}abc",
                        "name": tool["name"], "input": {"city": "Paris"}}]
            reason = "tool_use"
        else:
            content = [{"type": "text", "text": self.text}]
            reason = "end_turn"
        return {"id": f"msg_fake{len(self.requests):04d}", "type": "message",
                "role": "assistant", "model": body["model"], "content": content,
                "stop_reason": reason, "stop_sequence": None,
                "usage": {"input_tokens": self.usage[0], "output_tokens": self.usage[1]}}

    def _events(self, message: dict[str, Any]) -> bytes:
        out = [_event("message_start", {"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None,
            "usage": {"input_tokens": self.usage[0], "output_tokens": 1}}}),
            _event("ping", {"type": "ping"})]
        for i, block in enumerate(message["content"]):
            if block["type"] == "text":
                out.append(_event("content_block_start", {
                    "type": "content_block_start", "index": i,
                    "content_block": {"type": "text", "text": ""}}))
                words = block["text"].split(" ")
                for j, word in enumerate(words):
                    piece = word if j == 0 else " " + word
                    out.append(_event("content_block_delta", {
                        "type": "content_block_delta", "index": i,
                        "delta": {"type": "text_delta", "text": piece}}))
                    if self.cut_stream:
                        return b"".join(out)
            else:
                out.append(_event("content_block_start", {
                    "type": "content_block_start", "index": i,
                    "content_block": {**block, "input": {}}}))
                args = json.dumps(block["input"])
                for piece in (args[:5], args[5:]):
                    out.append(_event("content_block_delta", {
                        "type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": piece}}))
            out.append(_event("content_block_stop", {"type": "content_block_stop",
                                                     "index": i}))
        out.append(_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": self.usage[1]}}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)


def _event(name: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def error(status: int, message: str) -> httpx.Response:
    kind = _ERROR_TYPES.get(status, "api_error")
    return httpx.Response(status, json={"type": "error",
                                        "error": {"type": kind, "message": message},
                                        "request_id": "req_fake"})


def validate(body: Any) -> None:
    if not isinstance(body, dict):
        raise Invalid("request body must be a JSON object")
    extra = sorted(set(body) - _TOP)
    if extra:
        raise Invalid(f"{extra[0]}: Extra inputs are not permitted")
    for name in ("model", "messages", "max_tokens"):
        if name not in body:
            raise Invalid(f"{name}: Field required")
    mt = body["max_tokens"]
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise Invalid("max_tokens: Input should be a valid integer of at least 1")
    t = body.get("temperature")
    if t is not None and not (isinstance(t, (int, float)) and 0 <= t <= 1):
        raise Invalid("temperature: Input should be less than or equal to 1")
    if "system" in body and not isinstance(body["system"], (str, list)):
        raise Invalid("system: Input should be a valid string or list of text blocks")
    _tools(body)
    _messages(body["messages"])


def _tools(body: Mapping[str, Any]) -> None:
    tools = body.get("tools") or []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not _TOOL_NAME.match(str(tool.get("name", ""))):
            raise Invalid(f"tools.{i}.name: String should match pattern "
                          "'^[a-zA-Z0-9_-]{1,64}$'")
        if not isinstance(tool.get("input_schema"), dict):
            raise Invalid(f"tools.{i}.input_schema: Field required")
        extra = set(tool) - {"name", "description", "input_schema", "type", "cache_control"}
        if extra:
            raise Invalid(f"tools.{i}.{sorted(extra)[0]}: Extra inputs are not permitted")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "none",
                                                                       "tool"):
            raise Invalid("tool_choice: Input tag does not match any of the expected tags: "
                          "'auto', 'any', 'tool', 'none'")
        if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
            raise Invalid("tool_choice.name: Field required")


def _messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages: at least one message is required")
    previous_uses: set[str] = set()
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise Invalid(f"messages.{i}: Input should be a valid dictionary")
        role = msg.get("role")
        if role == "system":
            raise Invalid('messages: Unexpected role "system". The Messages API accepts a '
                          'top-level `system` parameter, not "system" as an input message '
                          "role.")
        if role not in ("user", "assistant"):
            raise Invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i == 0 and role != "user":
            raise Invalid("messages: first message must use the \"user\" role")
        if i > 0 and messages[i - 1].get("role") == role:
            raise Invalid('messages: roles must alternate between "user" and "assistant", '
                          f'but found multiple "{role}" roles in a row')
        content = msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or (not blocks and i < len(messages) - 1):
            raise Invalid(f"messages.{i}.content: Input should be a valid list")
        allowed = _USER_BLOCKS if role == "user" else _ASSISTANT_BLOCKS
        results: list[str] = []
        uses: set[str] = set()
        seen_other = False
        for j, block in enumerate(blocks):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in allowed:
                raise Invalid(f"messages.{i}.content.{j}.type: Input tag '{kind}' found "
                              f"using 'type' is not allowed in a {role} message")
            if kind == "text" and not block.get("text"):
                raise Invalid(f"messages.{i}.content.{j}: text content blocks must be "
                              "non-empty")
            if kind == "tool_use":
                if not _ID.match(str(block.get("id", ""))):
                    raise Invalid(f"messages.{i}.content.{j}.tool_use.id: String should "
                                  "match pattern '^[a-zA-Z0-9_-]+$'")
                if not isinstance(block.get("input"), dict):
                    raise Invalid(f"messages.{i}.content.{j}.tool_use.input: Input should "
                                  "be a valid dictionary")
                uses.add(block["id"])
            if kind == "tool_result":
                if seen_other:
                    raise Invalid(f"messages.{i}.content.{j}: tool_result blocks must come "
                                  "first in the content of a user message")
                results.append(str(block.get("tool_use_id", "")))
            else:
                seen_other = True
        unexpected = [r for r in results if r not in previous_uses]
        if unexpected:
            raise Invalid(f"messages.{i}.content.0: unexpected `tool_use_id` found in "
                          f"`tool_result` blocks: {', '.join(unexpected)}. Each `tool_result` "
                          "block must have a corresponding `tool_use` block in the previous "
                          "message.")
        missing = sorted(previous_uses - set(results))
        if missing:
            raise Invalid(f"messages.{i - 1}: `tool_use` ids were found without "
                          f"`tool_result` blocks immediately after: {', '.join(missing)}. "
                          "Each `tool_use` block must have a corresponding `tool_result` "
                          "block in the next message.")
        previous_uses = uses

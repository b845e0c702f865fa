"""Anthropic as an upstream (provider kind `anthropic`): chat completions -> Messages and
back, and Messages requests passed through as they came.

The reverse of router.providers.anthropic (which turns a caller's Messages request into
chat): a chat request routed to Claude becomes a Messages request (system lifted to the
top level, tool calls as tool_use blocks, tool messages as tool_result blocks in the next
user turn, turns of one role merged since Anthropic wants them alternating), and the
Message or its event stream becomes a chat completion or its chunks again. A caller that
spoke Messages itself (`/v1/messages`) is passed through natively: its body goes to Claude
as sent (model swapped), its answer comes back untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.config import Endpoint
from router.errors import InvalidRequest
from router.providers.base import Prepared
from router.providers.shapes import arguments_object, event_data
from router.providers.tool_ids import IdMap

ANTHROPIC_VERSION = "2023-06-01"
NATIVE = "anthropic-native"  # Prepared.reshape: a Messages body passed through
TO_CHAT = "anthropic-chat"  # Prepared.reshape: Messages answers become chat ones

_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
           "max_tokens": "length", "model_context_window_exceeded": "length",
           "tool_use": "tool_calls", "refusal": "content_filter"}
# Chat fields with no Messages counterpart that change nothing about the answer's
# content; anything else unknown is dropped too, as Anthropic refuses extra inputs.
_DATA_URL_PREFIX = "data:"


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# -- request: chat -> Messages -------------------------------------------------------

def chat_to_request(body: Mapping[str, Any], model_id: str) -> dict[str, Any]:
    """The Messages request for a chat completions request. Raises InvalidRequest for
    what Claude cannot take (n > 1, a content part it has no block for)."""
    out: dict[str, Any] = {"model": model_id}
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, msg in enumerate(body.get("messages") or ()):
        if not isinstance(msg, Mapping):
            continue
        role = msg.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(msg.get("content")))
            continue
        if role == "assistant":
            blocks = _assistant_blocks(msg)
            _append(turns, "assistant", blocks)
        elif role == "tool":
            _append(turns, "user", [{"type": "tool_result",
                                     "tool_use_id": str(msg.get("tool_call_id") or ""),
                                     "content": _text_of(msg.get("content"))}])
        else:
            _append(turns, "user", _user_blocks(msg.get("content"), i))
    for turn in turns:
        # Anthropic wants a user turn's tool results first.
        turn["content"].sort(key=lambda b: b["type"] != "tool_result")
    if system:
        out["system"] = "\n".join(s for s in system if s)
    out["messages"] = turns
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise InvalidRequest("n above 1 is not available on this alias's Anthropic offering",
                             param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        out["max_tokens"] = max_tokens
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        out["temperature"] = min(float(temperature), 1.0)  # OpenAI's 0-2, Anthropic's 0-1
    for key in ("top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop:
        out["stop_sequences"] = [s for s in stop if isinstance(s, str) and s]
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = [_tool(t) for t in tools if isinstance(t, Mapping)]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and "tools" in out:
        out["tool_choice"] = choice
    if body.get("stream") is True:
        out["stream"] = True
    return out


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": list(blocks)})


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content
                         if isinstance(p, Mapping) and p.get("type") == "text")
    return ""


def _assistant_blocks(msg: Mapping[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = _text_of(msg.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            continue
        blocks.append({"type": "tool_use", "id": str(call.get("id") or ""),
                       "name": str(fn.get("name") or ""),
                       "input": arguments_object(fn.get("arguments"))})
    return blocks


def _user_blocks(content: Any, i: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content if isinstance(content, list) else ()):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            blocks.append(_image(str(url or ""), f"messages[{i}].content[{j}]"))
        else:
            raise InvalidRequest(f"messages[{i}].content[{j}]: a '{kind}' part has no "
                                 "counterpart on this alias's Anthropic offering",
                                 param=f"messages[{i}].content[{j}]")
    return blocks


def _image(url: str, where: str) -> dict[str, Any]:
    if url.startswith(_DATA_URL_PREFIX) and ";base64," in url:
        media, data = url[len(_DATA_URL_PREFIX):].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media,
                                            "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest(f"{where}: an image must be a data: or http(s) URL", param=where)


def _tool(t: Mapping[str, Any]) -> dict[str, Any]:
    fn = _obj(t.get("function"))
    out: dict[str, Any] = {"name": str(fn.get("name") or ""),
                           "input_schema": fn.get("parameters")
                           or {"type": "object", "properties": {}}}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice in ("required", "any"):
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        out = {"type": "tool", "name": str(choice["function"].get("name") or "")}
    else:
        out = {"type": "auto"} if parallel is False else None
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


# -- response: Message -> chat -------------------------------------------------------

def usage_to_chat(usage: Any) -> dict[str, int]:
    u = usage if isinstance(usage, Mapping) else {}
    p = sum(v for k in ("input_tokens", "cache_creation_input_tokens",
                        "cache_read_input_tokens")
            if isinstance(v := u.get(k), int))
    c = u.get("output_tokens")
    c = c if isinstance(c, int) else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def message_to_chat(data: Mapping[str, Any], model: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in data.get("content") or ():
        if not isinstance(block, Mapping):
            continue
        if block.get("type") == "text":
            text.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append({"id": str(block.get("id") or ""), "type": "function",
                          "function": {"name": str(block.get("name") or ""),
                                       "arguments": orjson.dumps(
                                           block.get("input") or {}).decode()}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = calls
    finish = _FINISH.get(str(data.get("stop_reason")), "stop")
    return {"id": "chatcmpl-" + str(data.get("id") or ""), "object": "chat.completion",
            "created": 0, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage_to_chat(data.get("usage"))}


# -- stream: Messages events -> chat chunks ------------------------------------------

@dataclass(slots=True)
class ChatChunks:
    """Messages stream events in, chat completion chunks (as SSE `data:` events) out."""

    model: str
    id: str = ""
    input_tokens: int = 0
    tools: dict[int, int] = field(default_factory=dict)  # block index -> tool call index

    def convert(self, event: bytes) -> bytes | None:
        data = event_data(event)
        if data is None:
            return None
        kind = data.get("type")
        if kind == "message_start":
            msg = _obj(data.get("message"))
            self.id = "chatcmpl-" + str(msg.get("id") or "")
            self.input_tokens = usage_to_chat(msg.get("usage"))["prompt_tokens"]
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = data.get("content_block")
            if isinstance(block, Mapping) and block.get("type") == "tool_use":
                n = self.tools[int(data.get("index", 0))] = len(self.tools)
                return self._chunk({"tool_calls": [{
                    "index": n, "id": str(block.get("id") or ""), "type": "function",
                    "function": {"name": str(block.get("name") or ""), "arguments": ""}}]})
            return None
        if kind == "content_block_delta":
            delta = _obj(data.get("delta"))
            if delta.get("type") == "text_delta":
                return self._chunk({"content": str(delta.get("text", ""))})
            if delta.get("type") == "input_json_delta":
                tool = self.tools.get(int(data.get("index", 0)))
                if tool is None:
                    return None
                return self._chunk({"tool_calls": [{
                    "index": tool, "function": {"arguments": str(delta.get("partial_json", ""))}}]})
            return None  # thinking and signature deltas: nothing a chat client reads
        if kind == "message_delta":
            delta = _obj(data.get("delta"))
            usage = usage_to_chat({**_obj(data.get("usage")),
                                   "input_tokens": self.input_tokens})
            return self._chunk({}, _FINISH.get(str(delta.get("stop_reason")), "stop"), usage)
        if kind == "message_stop":
            return b"data: [DONE]\n\n"
        if kind == "error":
            err = _obj(data.get("error"))
            return b"data: " + orjson.dumps({"error": {
                "message": str(err.get("message") or "the provider's stream failed"),
                "type": str(err.get("type") or "api_error"), "param": None,
                "code": None}}) + b"\n\n"
        return None  # ping, content_block_stop

    def _chunk(self, delta: dict[str, Any], finish: str | None = None,
               usage: dict[str, int] | None = None) -> bytes:
        out: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                               "created": 0, "model": self.model,
                               "choices": [{"index": 0, "delta": delta,
                                            "finish_reason": finish}]}
        if usage is not None:
            out["usage"] = usage
        return b"data: " + orjson.dumps(out) + b"\n\n"


# -- the translator ------------------------------------------------------------------

class AnthropicTranslator:
    """The Translator of `kind: anthropic` providers. Only chat goes there (the catalog
    offers no other endpoint through it)."""

    def request(self, endpoint: Endpoint, body: dict[str, Any], model_id: str,
                include_usage: bool) -> Prepared:
        if endpoint != "chat":
            raise InvalidRequest(f"the {endpoint} endpoint is not available on Anthropic")
        prep = Prepared("/messages", chat_to_request(body, model_id), IdMap(), TO_CHAT)
        if body.get("stream") is True:
            prep.events = ChatChunks(str(body.get("model") or model_id)).convert
        return prep

    def native(self, body: Mapping[str, Any], model_id: str) -> Prepared:
        """A caller's own Messages request, as it came but for the model."""
        return Prepared("/messages", {**body, "model": model_id}, IdMap(), NATIVE)

    def response(self, prep: Prepared, data: dict[str, Any]) -> bool:
        if prep.reshape != TO_CHAT:
            return False
        chat = message_to_chat(data, str(data.get("model") or ""))
        data.clear()
        data.update(chat)
        return True

    def chunk(self, prep: Prepared, data: dict[str, Any]) -> bool:
        return False  # streams are converted whole events at a time (Prepared.events)


def native_usage(data: Mapping[str, Any]) -> dict[str, int] | None:
    """The chat-shaped usage a native Messages event or Message carries, if any."""
    kind = data.get("type")
    if kind == "message_start":
        msg = data.get("message")
        return usage_to_chat(msg.get("usage")) if isinstance(msg, Mapping) else None
    if kind in ("message_delta", "message") and isinstance(data.get("usage"), Mapping):
        return usage_to_chat(data["usage"])
    return None

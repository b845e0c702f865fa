"""La Plateforme: OpenAI-compatible, with its own stricter rules.

It rejects fields it does not know (422), names some differently (`random_seed`), wants
`"any"` where OpenAI says `"required"`, and accepts only tool-call ids of exactly nine
characters of [a-zA-Z0-9]. Fill-in-the-middle lives at /fim/completions and answers in the
chat shape, so it is reshaped into a text completion for the caller.
"""

from __future__ import annotations

import time
from typing import Any

from router.config import Endpoint
from router.providers.base import Prepared
from router.providers.tool_ids import IdMap, restore_ids, rewrite_message_ids

# Every field of La Plateforme's request models (mistralai 3.7's ChatCompletionRequest and
# FIMCompletionRequest; tests/unit/test_mistral_schema.py checks these sets against the SDK),
# so a caller gets everything Mistral can do; only what it would reject (422) is dropped.
_CHAT_FIELDS = frozenset({
    "model", "messages", "temperature", "top_p", "max_tokens", "stream", "stop",
    "random_seed", "metadata", "response_format", "tools", "tool_choice", "presence_penalty",
    "frequency_penalty", "min_tokens", "repetition_penalty", "top_k", "logprobs",
    "top_logprobs", "prompt_logprobs", "top_prompt_logprobs", "n", "prediction",
    "parallel_tool_calls", "reasoning_effort", "prompt_mode", "guardrails",
    "prompt_cache_key", "service_tier", "safe_prompt",
})
_FIM_FIELDS = frozenset({
    "model", "prompt", "suffix", "temperature", "top_p", "max_tokens", "min_tokens",
    "stream", "stop", "random_seed", "metadata", "prompt_cache_key",
})
# OpenAI's service tiers ("default", "flex", "priority", ...) are not Mistral's: only the
# values La Plateforme knows go through.
# A tuple: the caller's value may be an object, which a set cannot hash.
_SERVICE_TIERS = ("auto", "standard_only")
_EMBED_FIELDS = frozenset({"model", "input", "output_dimension", "output_dtype",
                           "encoding_format"})
# Per role, the message fields La Plateforme accepts (it rejects e.g. `name` on a user).
_MESSAGE_FIELDS: dict[str, frozenset[str]] = {
    "system": frozenset({"role", "content"}),
    "user": frozenset({"role", "content"}),
    "assistant": frozenset({"role", "content", "tool_calls", "prefix"}),
    "tool": frozenset({"role", "content", "tool_call_id", "name"}),
}


class MistralTranslator:
    def request(self, endpoint: Endpoint, body: dict[str, Any], model_id: str,
                include_usage: bool) -> Prepared:
        # La Plateforme always reports usage in its last streamed chunk; it has no
        # stream_options, so `include_usage` needs nothing here.
        src = body
        if endpoint in ("fim", "completions"):
            out = {k: v for k, v in src.items() if k in _FIM_FIELDS}
            if "suffix" in out and not out["suffix"]:
                del out["suffix"]
            path, allowed, reshape = "/fim/completions", _FIM_FIELDS, "fim"
        elif endpoint == "embeddings":
            out = {k: v for k, v in src.items() if k in _EMBED_FIELDS}
            path, allowed, reshape = "/embeddings", _EMBED_FIELDS, None
        else:
            out = {k: v for k, v in src.items() if k in _CHAT_FIELDS}
            path, allowed, reshape = "/chat/completions", _CHAT_FIELDS, None
        if "seed" in src and "random_seed" not in src and "random_seed" in allowed:
            out["random_seed"] = src["seed"]
        if "max_completion_tokens" in src and "max_tokens" not in src and "max_tokens" in allowed:
            out["max_tokens"] = src["max_completion_tokens"]
        if out.get("tool_choice") == "required":
            out["tool_choice"] = "any"
        if "service_tier" in out and out["service_tier"] not in _SERVICE_TIERS:
            del out["service_tier"]
        out["model"] = model_id
        ids = IdMap()
        if endpoint == "chat":
            msgs = out.get("messages")
            if isinstance(msgs, list):
                out["messages"] = [_message(m) for m in msgs]
            rewrite_message_ids(out, ids)
        return Prepared(path, out, ids, reshape)

    def response(self, prep: Prepared, data: dict[str, Any]) -> bool:
        if prep.reshape == "fim":
            _fim_to_completion(data, "message")
            return True
        return restore_ids(data, prep.ids, "message")

    def chunk(self, prep: Prepared, data: dict[str, Any]) -> bool:
        if prep.reshape == "fim":
            _fim_to_completion(data, "delta")
            return True
        return restore_ids(data, prep.ids, "delta")


def _message(m: Any) -> Any:
    if not isinstance(m, dict):
        return m
    role = m.get("role")
    if role == "developer":  # OpenAI's newer name for the system role
        m = {**m, "role": "system"}
        role = "system"
    allowed = _MESSAGE_FIELDS.get(role) if isinstance(role, str) else None
    if allowed is None or m.keys() <= allowed:
        return m
    return {k: v for k, v in m.items() if k in allowed}


def _fim_to_completion(data: dict[str, Any], key: str) -> None:
    """Mistral's FIM answers in the chat shape; a /v1/completions caller expects `text`."""
    data["object"] = "text_completion"
    data.setdefault("created", int(time.time()))
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        msg = choice.pop(key, None)
        content = msg.get("content") if isinstance(msg, dict) else None
        choice["text"] = content if isinstance(content, str) else ""
        choice.setdefault("logprobs", None)

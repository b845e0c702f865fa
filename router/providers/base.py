"""The translator protocol and the pass-through translator of OpenAI-compatible upstreams."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from router.config import Endpoint, Priority
from router.providers.tool_ids import IdMap, restore_ids, rewrite_message_ids

_PATHS: dict[str, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "fim": "/completions",
    "embeddings": "/embeddings",
}


@dataclass(slots=True)
class Prepared:
    path: str
    body: dict[str, Any]
    ids: IdMap
    # How the upstream's answer must be reshaped for the caller (e.g. FIM -> completions).
    reshape: str | None = None
    # An upstream whose stream is not chat chunks (Anthropic's events): turns each whole
    # SSE event into a chat chunk event, `data: [DONE]`, or None to drop it.
    events: Callable[[bytes], bytes | None] | None = None


class Translator(Protocol):
    def request(self, endpoint: Endpoint, body: dict[str, Any], model_id: str,
                include_usage: bool) -> Prepared: ...

    def response(self, prep: Prepared, data: dict[str, Any]) -> bool:
        """Rewrite a whole JSON answer in place; True when anything changed."""
        ...

    def chunk(self, prep: Prepared, data: dict[str, Any]) -> bool:
        """Rewrite one streamed chunk in place; True when anything changed."""
        ...


class OpenAITranslator:
    """vLLM and plain OpenAI-compatible upstreams: the body passes through, model swapped.

    `mistral_ids` is for local engines serving Mistral chat templates, which enforce
    Mistral's 9-character tool-call ids just like La Plateforme does.
    """

    def __init__(self, *, mistral_ids: bool = False) -> None:
        self._mistral_ids = mistral_ids

    def request(self, endpoint: Endpoint, body: dict[str, Any], model_id: str,
                include_usage: bool) -> Prepared:
        out = dict(body)
        out["model"] = model_id
        if include_usage and out.get("stream") is True and endpoint != "embeddings":
            opts = out.get("stream_options")
            out["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                     "include_usage": True}
        ids = IdMap()
        if self._mistral_ids and endpoint == "chat":
            rewrite_message_ids(out, ids)
        return Prepared(_PATHS[endpoint], out, ids)

    def response(self, prep: Prepared, data: dict[str, Any]) -> bool:
        return restore_ids(data, prep.ids, "message")

    def chunk(self, prep: Prepared, data: dict[str, Any]) -> bool:
        return restore_ids(data, prep.ids, "delta")


# vLLM's `priority` per class (lower is scheduled earlier, ties by arrival), sent only to
# engines started with --scheduling-policy priority.
VLLM_PRIORITY: dict[Priority, int] = {"interactive": 0, "standard": 1, "batch": 2}


def engine_priority(prep: Prepared, priority: Priority | None) -> None:
    """Set the class's vLLM priority on a request for a priority-scheduled engine, or
    (None) drop any `priority` the caller put in the body: a caller picks its class with
    x-spillover-priority within its policy, never an engine priority of its own, and
    hosted providers are never sent one."""
    if priority is None:
        prep.body.pop("priority", None)
    else:
        prep.body["priority"] = VLLM_PRIORITY[priority]


def bound_output(prep: Prepared, endpoint: Endpoint, max_tokens: int) -> None:
    """Send the max_tokens a budget hold assumed when the caller set none, so an answer
    cannot outgrow what was reserved for it."""
    if endpoint == "embeddings" or prep.body.get("max_tokens") is not None \
            or prep.body.get("max_completion_tokens") is not None:
        return
    prep.body["max_tokens"] = max_tokens

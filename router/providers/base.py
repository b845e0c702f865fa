from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from router.config import Endpoint

_PATHS: dict[str, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "fim": "/completions",
    "embeddings": "/embeddings",
}


@dataclass(slots=True)
class IdMap:
    """Tool-call ids as the upstream saw them -> as the caller sent them."""

    back: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.back)


@dataclass(slots=True)
class Prepared:
    path: str
    body: dict[str, Any]
    ids: IdMap
    # How the upstream's answer must be reshaped for the caller (e.g. FIM -> completions).
    reshape: str | None = None


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
            from router.providers.mistral import rewrite_message_ids

            rewrite_message_ids(out, ids)
        return Prepared(_PATHS[endpoint], out, ids)

    def response(self, prep: Prepared, data: dict[str, Any]) -> bool:
        return restore_ids(data, prep.ids, "message")

    def chunk(self, prep: Prepared, data: dict[str, Any]) -> bool:
        return restore_ids(data, prep.ids, "delta")


def bound_output(prep: Prepared, endpoint: Endpoint, max_tokens: int) -> None:
    """Send the max_tokens a budget hold assumed when the caller set none, so an answer
    cannot outgrow what was reserved for it."""
    if endpoint == "embeddings" or prep.body.get("max_tokens") is not None \
            or prep.body.get("max_completion_tokens") is not None:
        return
    prep.body["max_tokens"] = max_tokens


def restore_ids(data: dict[str, Any], ids: IdMap, key: str) -> bool:
    if not ids:
        return False
    changed = False
    for choice in data.get("choices") or ():
        msg = choice.get(key) if isinstance(choice, dict) else None
        calls = msg.get("tool_calls") if isinstance(msg, dict) else None
        for call in calls or ():
            if isinstance(call, dict) and isinstance(call.get("id"), str) \
                    and call["id"] in ids.back:
                call["id"] = ids.back[call["id"]]
                changed = True
    return changed


def translator_for(flavour: str) -> Translator:
    if flavour == "mistral":
        from router.providers.mistral import MistralTranslator

        return MistralTranslator()
    if flavour == "vllm":
        return OpenAITranslator(mistral_ids=True)
    return OpenAITranslator()

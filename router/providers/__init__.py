"""Upstream adapters: how a request is shaped for each kind of OpenAI-compatible backend."""

from router.providers.anthropic_upstream import AnthropicTranslator
from router.providers.base import (
    VLLM_PRIORITY,
    OpenAITranslator,
    Prepared,
    Translator,
    bound_output,
    engine_priority,
)
from router.providers.mistral import MistralTranslator
from router.providers.tool_ids import IdMap, mistral_tool_id

__all__ = [
    "VLLM_PRIORITY",
    "AnthropicTranslator",
    "IdMap",
    "MistralTranslator",
    "OpenAITranslator",
    "Prepared",
    "Translator",
    "bound_output",
    "engine_priority",
    "mistral_tool_id",
    "translator_for",
]


def translator_for(flavour: str) -> Translator:
    if flavour == "mistral":
        return MistralTranslator()
    if flavour == "anthropic":
        return AnthropicTranslator()
    if flavour == "vllm":
        return OpenAITranslator(mistral_ids=True)
    return OpenAITranslator()

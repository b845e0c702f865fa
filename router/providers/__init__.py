"""Upstream adapters: how a request is shaped for each kind of OpenAI-compatible backend."""

from router.providers.base import (
    IdMap,
    OpenAITranslator,
    Prepared,
    Translator,
    bound_output,
    translator_for,
)
from router.providers.mistral import MistralTranslator, mistral_tool_id

__all__ = [
    "IdMap",
    "MistralTranslator",
    "OpenAITranslator",
    "Prepared",
    "Translator",
    "bound_output",
    "mistral_tool_id",
    "translator_for",
]

"""What the Mistral translation sends, checked against Mistral's own published request models.

The mistralai SDK's ChatCompletionRequest / FIMCompletionRequest are generated from La
Plateforme's API description: a neutral judge, unlike our fake. Its models ignore unknown
fields, so `_strict` forbids them: any key of the body (at any depth) the model does not
know is an error, as La Plateforme answers one with 422.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from mistralai.client.models import ChatCompletionRequest, FIMCompletionRequest
from pydantic import BaseModel

from router.providers import MistralTranslator
from router.providers.mistral import _CHAT_FIELDS, _FIM_FIELDS


def _field_names(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def _unknown(sent: Any, kept: Any, at: str = "") -> list[str]:
    """Paths present in `sent` that the validated model dropped."""
    if isinstance(sent, dict):
        if not isinstance(kept, dict):
            return [at or "."]
        out = []
        for k, v in sent.items():
            out += [f"{at}.{k}"] if k not in kept else _unknown(v, kept[k], f"{at}.{k}")
        return out
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        return [p for i, (s, k) in enumerate(zip(sent, kept, strict=True))
                for p in _unknown(s, k, f"{at}[{i}]")]
    return []


def _strict(model: type[BaseModel], body: dict[str, Any]) -> None:
    validated = model.model_validate(body)  # raises on a missing or mistyped field
    kept = validated.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert _unknown(body, kept) == [], f"fields {model.__name__} does not accept"


def test_strict_catches_unknown_fields_at_any_depth() -> None:
    ok = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    _strict(ChatCompletionRequest, ok)
    for bad in ({**ok, "user": "u"},
                {**ok, "messages": [{"role": "user", "content": "x", "name": "n"}]},
                {**ok, "tools": [{"type": "function", "function": {"name": "f",
                                                                    "parameters": {},
                                                                    "oops": 1}}]}):
        with pytest.raises(AssertionError):
            _strict(ChatCompletionRequest, bad)


def test_translator_knows_every_field_of_the_sdk_models() -> None:
    # A new SDK release with new fields fails here: add them to mistral.py's sets.
    assert set(_CHAT_FIELDS) == _field_names(ChatCompletionRequest)
    assert set(_FIM_FIELDS) == _field_names(FIMCompletionRequest)


# A valid value for every field La Plateforme accepts (OpenAI's spelling where it differs).
CHAT_ACCEPTED: dict[str, Any] = {
    "temperature": 0.3, "top_p": 0.9, "max_tokens": 64, "stream": True, "stop": ["\n\n"],
    "random_seed": 7, "metadata": {"app": "wiki"},
    "response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}, "strict": True}},
    "tools": [{"type": "function", "function": {"name": "f", "description": "d",
                                                "parameters": {"type": "object"},
                                                "strict": False}}],
    "tool_choice": {"type": "function", "function": {"name": "f"}},
    "presence_penalty": 0.1, "frequency_penalty": 0.2, "min_tokens": 1,
    "repetition_penalty": 1.1, "top_k": 40, "logprobs": True, "top_logprobs": 3,
    "prompt_logprobs": True, "top_prompt_logprobs": 2, "n": 2,
    "prediction": {"type": "content", "content": "draft"}, "parallel_tool_calls": False,
    "reasoning_effort": "low", "prompt_mode": "reasoning",
    "guardrails": [], "prompt_cache_key": "k-1", "service_tier": "auto", "safe_prompt": True,
}
# OpenAI (and vLLM) fields La Plateforme rejects.
CHAT_REJECTED: dict[str, Any] = {
    "user": "u-1", "logit_bias": {"50256": -100}, "store": True,
    "stream_options": {"include_usage": True}, "modalities": ["text"],
    "audio": {"voice": "alloy"}, "web_search_options": {}, "functions": [],
    "function_call": "auto", "verbosity": "low", "guided_json": {}, "best_of": 2,
    "service_tier": "priority", "x_made_up": {"deep": [1]},
}
MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi"}],
    [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi",
                                                    "name": "ann"}],
    [{"role": "system", "content": "s", "name": "sys"},
     {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                  {"type": "image_url",
                                   "image_url": {"url": "https://x.test/a.png"}}]}],
    [{"role": "user", "content": "call f"},
     {"role": "assistant", "content": None, "name": "bot", "refusal": None,
      "tool_calls": [{"id": "call_abcdefghijklmnop", "type": "function",
                      "function": {"name": "f", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "call_abcdefghijklmnop", "name": "f", "content": "42"},
     {"role": "assistant", "content": "The answer is", "prefix": True}],
]
TOOL_CHOICES: list[Any] = ["auto", "none", "required", "any",
                           {"type": "function", "function": {"name": "f"}}]
RESPONSE_FORMATS: list[Any] = [{"type": "text"}, {"type": "json_object"},
                               CHAT_ACCEPTED["response_format"]]


def _chat_variants() -> list[tuple[str, dict[str, Any]]]:
    base = {"model": "demo"}
    out: list[tuple[str, dict[str, Any]]] = []
    for i, msgs in enumerate(MESSAGES):
        out.append((f"messages-{i}", {**base, "messages": msgs}))
        out.append((f"messages-{i}-everything", {**base, "messages": msgs, **CHAT_ACCEPTED}))
        out.append((f"messages-{i}-rejected", {**base, "messages": msgs, **CHAT_REJECTED}))
    for name, value in itertools.chain(CHAT_ACCEPTED.items(), CHAT_REJECTED.items()):
        out.append((f"only-{name}-{value!r:.20}",
                    {**base, "messages": MESSAGES[0], name: value}))
    for choice, fmt in itertools.product(TOOL_CHOICES, RESPONSE_FORMATS):
        out.append((f"tool_choice-{choice!r:.12}-format-{fmt['type']}",
                    {**base, "messages": MESSAGES[3], "tools": CHAT_ACCEPTED["tools"],
                     "tool_choice": choice, "response_format": fmt}))
    # OpenAI's names for Mistral's fields.
    out.append(("openai-names", {**base, "messages": MESSAGES[0], "seed": 3,
                                 "max_completion_tokens": 9}))
    return out


@pytest.mark.parametrize("body", [b for _, b in _chat_variants()],
                         ids=[n for n, _ in _chat_variants()])
def test_every_translated_chat_body_is_one_la_plateforme_accepts(body: dict[str, Any]) -> None:
    prep = MistralTranslator().request("chat", body, "mistral-small-latest", True)
    assert prep.path == "/chat/completions"
    _strict(ChatCompletionRequest, prep.body)
    # Nothing La Plateforme accepts is lost on the way.
    for name, value in body.items():
        if name in CHAT_ACCEPTED and CHAT_ACCEPTED.get(name) == value and name != "tool_choice":
            assert prep.body[name] == value, name
    if "seed" in body:
        assert prep.body["random_seed"] == body["seed"]
    if "max_completion_tokens" in body:
        assert prep.body["max_tokens"] == body["max_completion_tokens"]


def test_logprobs_reach_la_plateforme() -> None:
    body = {"model": "demo", "messages": MESSAGES[0], "logprobs": True, "top_logprobs": 5}
    prep = MistralTranslator().request("chat", body, "mistral-small-latest", True)
    assert prep.body["logprobs"] is True and prep.body["top_logprobs"] == 5


FIM_ACCEPTED: dict[str, Any] = {
    "suffix": "return x", "temperature": 0.2, "top_p": 0.95, "max_tokens": 32,
    "min_tokens": 1, "stream": True, "stop": "\n", "random_seed": 1,
    "metadata": {"app": "ide"}, "prompt_cache_key": "k",
}
# /v1/completions fields FIM does not take.
FIM_REJECTED: dict[str, Any] = {
    "echo": False, "logprobs": 2, "best_of": 1, "n": 1, "user": "u", "logit_bias": {},
    "presence_penalty": 0.1, "stream_options": {"include_usage": True}, "x_made_up": [],
}


def _fim_variants() -> list[tuple[str, dict[str, Any]]]:
    base = {"model": "codestral", "prompt": "def f("}
    out = [("bare", base), ("everything", {**base, **FIM_ACCEPTED}),
           ("rejected", {**base, **FIM_REJECTED}),
           ("all", {**base, **FIM_ACCEPTED, **FIM_REJECTED}),
           ("empty-suffix", {**base, "suffix": ""}), ("seed", {**base, "seed": 4})]
    out += [(f"only-{k}", {**base, k: v})
            for k, v in itertools.chain(FIM_ACCEPTED.items(), FIM_REJECTED.items())]
    return out


@pytest.mark.parametrize("endpoint", ["fim", "completions"])
@pytest.mark.parametrize("body", [b for _, b in _fim_variants()],
                         ids=[n for n, _ in _fim_variants()])
def test_every_translated_fim_body_is_one_la_plateforme_accepts(
        endpoint: str, body: dict[str, Any]) -> None:
    prep = MistralTranslator().request(endpoint, body, "codestral-latest", False)  # type: ignore[arg-type]
    assert prep.path == "/fim/completions"
    _strict(FIMCompletionRequest, prep.body)
    for name, value in body.items():
        if name in FIM_ACCEPTED and not (name == "suffix" and not value):
            assert prep.body[name] == value, name

from __future__ import annotations

import re

from router.providers import MistralTranslator, OpenAITranslator, mistral_tool_id
from router.providers.base import IdMap, Prepared


def test_tool_ids_are_nine_alnum_and_stable() -> None:
    for original in ("call_1", "chatcmpl-tool-8f3a9b2c4d5e6f70", "x" * 200, "ünïcode"):
        new = mistral_tool_id(original)
        assert re.fullmatch(r"[a-zA-Z0-9]{9}", new)
        assert mistral_tool_id(original) == new
    assert mistral_tool_id("abcDEF123") == "abcDEF123"
    assert mistral_tool_id("call_1") != mistral_tool_id("call_2")


def test_request_keeps_only_what_la_plateforme_accepts() -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "x", "weird": 1}],
            "seed": 3, "user": "u", "logit_bias": {}, "max_completion_tokens": 9,
            "stream_options": {"include_usage": True}, "tool_choice": "required"}
    prep = MistralTranslator().request("chat", body, "mistral-small-latest", True)
    assert prep.path == "/chat/completions"
    assert prep.body == {"model": "mistral-small-latest", "random_seed": 3, "max_tokens": 9,
                         "tool_choice": "any", "messages": [{"role": "user", "content": "x"}]}
    assert body["model"] == "demo"  # the caller's body is never mutated


def test_fim_goes_to_its_own_endpoint_and_comes_back_as_text() -> None:
    t = MistralTranslator()
    prep = t.request("fim", {"model": "c", "prompt": "def f(", "suffix": "return x",
                             "echo": False}, "codestral-latest", False)
    assert prep.path == "/fim/completions"
    assert prep.body == {"model": "codestral-latest", "prompt": "def f(", "suffix": "return x"}
    data = {"id": "1", "object": "chat.completion", "model": "codestral-latest",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x):"},
                         "finish_reason": "stop"}]}
    assert t.response(prep, data)
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "x):"


def test_vllm_passthrough_adds_usage_for_streams_only() -> None:
    t = OpenAITranslator()
    prep = t.request("chat", {"model": "demo", "messages": [], "stream": True}, "m", True)
    assert prep.body["stream_options"] == {"include_usage": True}
    prep = t.request("chat", {"model": "demo", "messages": []}, "m", True)
    assert "stream_options" not in prep.body


def test_restore_ids_in_stream_chunks() -> None:
    prep = Prepared("/chat/completions", {}, IdMap({"abcDEF123": "call_orig"}))
    chunk = {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "abcDEF123"}]}}]}
    assert OpenAITranslator().chunk(prep, chunk)
    assert chunk["choices"][0]["delta"]["tool_calls"][0]["id"] == "call_orig"

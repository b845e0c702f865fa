"""Tiered aliases without a gateway: config checks, the default scorer as a table, pins,
caps, sticky conversations on a fake clock, the plug-in's fallback, cascade triggers."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from router.config import Caller, Cascade, ConfigError, Scorer, parse_config
from router.errors import Forbidden, InvalidRequest
from router.routing.tiers import (
    FEATURES,
    RequestView,
    Tiers,
    cascade_trigger,
    default_score,
    view_of,
)

PLAIN = """\
providers:
  mistral: {base_url: "https://x/v1", kind: mistral}
aliases:
  small:
    hosted: [{provider: mistral, model: mistral-small-latest,
              price: {input_per_mtok: 0.1, output_per_mtok: 0.3}}]
  medium:
    hosted: [{provider: mistral, model: mistral-medium-latest,
              price: {input_per_mtok: 0.4, output_per_mtok: 2}}]
  large:
    hosted: [{provider: mistral, model: mistral-large-latest,
              price: {input_per_mtok: 2, output_per_mtok: 6}}]
"""
TIERED = PLAIN + """\
  auto:
    tiers: [small, medium, large]
    thresholds: [0.3, 0.6]
    sticky_s: 60
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    return [str(p) for p in exc.value.problems]


def test_a_tiered_alias_validates() -> None:
    cfg = parse_config(TIERED)
    assert cfg.aliases["auto"].tiers == ["small", "medium", "large"]


@pytest.mark.parametrize(("extra", "line", "needle"), [
    ("  auto:\n    tiers: [small, nowhere]\n    thresholds: [0.5]\n", 14,
     "aliases.auto.tiers.1: unknown alias 'nowhere'"),
    ("  auto:\n    tiers: [small, large]\n    thresholds: [0.5, 0.7]\n", 15,
     "2 tiers need 1 thresholds, not 2"),
    ("  auto:\n    tiers: [small, medium, large]\n    thresholds:\n      - 0.6\n      - 0.4\n",
     17, "aliases.auto.thresholds.1: 0.4 is not above the threshold before it"),
    ("  auto:\n    tiers: [small, large]\n    thresholds: [1.5]\n", 15,
     "aliases.auto.thresholds.0: 1.5 is not in (0, 1]"),
    ("  auto:\n    tiers: [small]\n    thresholds: []\n", 14, "at least two tiers"),
    ("  auto:\n    tiers: [small, large]\n    thresholds: [0.5]\n"
     "    scorer: {weights: {tools: 0.6}}\n", 16,
     "would let the tool count alone reach the top tier"),
    ("  auto:\n    tiers: [small, large]\n    thresholds: [0.5]\n"
     "    hosted: [{provider: mistral, model: m,\n"
     "              price: {input_per_mtok: 1, output_per_mtok: 1}}]\n", 13,
     "no local deployments or hosted offerings of its own"),
])
def test_config_errors_carry_their_line(extra: str, line: int, needle: str) -> None:
    found = problems(PLAIN + extra)
    assert any(needle in p and p.startswith(f"line {line}:") for p in found), found


def test_a_cycle_of_tiered_aliases_is_named() -> None:
    text = PLAIN + """\
  auto:
    tiers: [small, other]
    thresholds: [0.5]
  other:
    tiers: [medium, auto]
    thresholds: [0.5]
"""
    found = problems(text)
    assert any(p.startswith("line 14:") and "cycle (auto -> other -> auto)" in p
               for p in found), found
    assert any(p.startswith("line 17:") and "cycle (other -> auto -> other)" in p
               for p in found), found


def test_a_tiered_alias_of_a_tiered_alias_is_refused_without_a_cycle() -> None:
    text = TIERED + "  top:\n    tiers: [small, auto]\n    thresholds: [0.5]\n"
    assert any("'auto' is itself tiered" in p for p in problems(text))


# -- the default scorer ----------------------------------------------------------------

def chat(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


def parts(body: dict[str, Any], scorer: Scorer | None = None) -> dict[str, float]:
    _, p = default_score(view_of("chat", body), scorer or Scorer())
    return {k: v["value"] for k, v in p.items()}


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


@pytest.mark.parametrize(("feature", "body"), [
    ("prompt_tokens", chat("word " * 4000)),
    ("conversation_depth", {"model": "auto", "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "ok"} for i in range(17)]}),
    ("tools", chat(tools=[TOOL] * 20)),
    ("response_schema", chat(response_format=SCHEMA)),
    ("code_blocks", chat("fix ```a = 1``` and ```b = 2```")),
    ("reasoning", chat("explain step by step why, then prove it")),
    ("requested_length", chat(max_tokens=8000)),
])
def test_each_feature_moves_alone(feature: str, body: dict[str, Any]) -> None:
    base = parts(chat())
    got = parts(body)
    assert got[feature] > base[feature]
    assert got[feature] == pytest.approx(1.0), got
    others = {k for k in FEATURES if k != feature and abs(got[k] - base[k]) > 0.01}
    assert not others, others


def test_score_is_the_weighted_sum_capped_at_one() -> None:
    view = view_of("chat", chat("explain step by step why, then prove it ```x``` " * 600,
                                response_format=SCHEMA, max_tokens=9000, tools=[TOOL] * 30))
    score, p = default_score(view, Scorer())
    assert score == 1.0
    assert sum(v["contribution"] for v in p.values()) > 1
    low, _ = default_score(view_of("chat", chat("hello")), Scorer())
    assert 0 <= low < 0.05


@pytest.mark.parametrize("grow", [
    lambda n: chat("word " * (n * 400)),
    lambda n: chat(max_tokens=1 + n * 500),
    lambda n: chat("x", tools=[TOOL] * n),
    lambda n: {"model": "auto", "messages": [{"role": "user", "content": "q"}] * (n + 1)},
])
def test_score_never_falls_as_a_feature_grows(grow: Any) -> None:
    scores = [default_score(view_of("chat", grow(n)), Scorer())[0] for n in range(12)]
    assert scores == sorted(scores)
    assert scores[-1] > scores[0]


def test_tool_heavy_agent_traffic_stays_on_the_everyday_tier() -> None:
    """Fifty tools with long schemas, many tool results, a short question: an agent loop,
    not a hard request; tool definitions do not count as prompt text."""
    big_tool = {"type": "function", "function": {
        "name": "lookup", "description": "d" * 2000,
        "parameters": {"type": "object", "properties": {f"p{i}": {"type": "string"}
                                                          for i in range(40)}}}}
    messages: list[dict[str, Any]] = [{"role": "user", "content": "book me a room"}]
    for i in range(6):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function",
             "function": {"name": "lookup", "arguments": "{}"}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": "ok"})
    body = {"model": "auto", "messages": messages, "tools": [big_tool] * 50}
    tiers = Tiers(parse_config(TIERED))
    d = tiers.decide("auto", "agent", Caller(), "chat", body, {})
    assert d.parts["tools"]["value"] == 1.0
    assert d.index < 2 and d.tier != "large", d


# -- decisions: thresholds, pins, caps, sticky -----------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


HARD = "Explain step by step why this fails, then prove the fix and compare the " \
       "trade-offs:\n```py\nx = 1\n```\n```py\ny = 2\n```"


def test_thresholds_pick_the_tier() -> None:
    tiers = Tiers(parse_config(TIERED))
    easy = tiers.decide("auto", "a", Caller(), "chat", chat("hello"), {})
    assert (easy.tier, easy.reason) == ("small", "none")
    hard = tiers.decide("auto", "a", Caller(), "chat", chat(HARD, max_tokens=4000), {})
    assert hard.score >= 0.6 and (hard.tier, hard.reason) == ("large", "score")


def test_pin_needs_permission_and_names_a_tier() -> None:
    tiers = Tiers(parse_config(TIERED))
    with pytest.raises(Forbidden):
        tiers.decide("auto", "a", Caller(), "chat", chat(), {"x-spillover-tier": "large"})
    pinner = Caller(may_pin_tier=True)
    d = tiers.decide("auto", "a", pinner, "chat", chat(HARD), {"x-spillover-tier": "small"})
    assert (d.tier, d.reason) == ("small", "pinned")
    assert tiers.decide("auto", "a", pinner, "chat", chat(), {"x-spillover-tier": "2"}).tier \
        == "medium"
    with pytest.raises(InvalidRequest):
        tiers.decide("auto", "a", pinner, "chat", chat(), {"x-spillover-tier": "huge"})


def test_cap_holds_against_score_and_pin() -> None:
    tiers = Tiers(parse_config(TIERED))
    capped = Caller(max_tier=2, may_pin_tier=True)
    d = tiers.decide("auto", "a", capped, "chat", chat(HARD, max_tokens=4000), {})
    assert (d.tier, d.reason) == ("medium", "capped")
    d = tiers.decide("auto", "a", capped, "chat", chat(), {"x-spillover-tier": "large"})
    assert (d.tier, d.reason) == ("medium", "capped")
    assert tiers.next_up(d, capped) is None


def conversation(*turns: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}]
    for i, t in enumerate(turns):
        if i:
            messages.append({"role": "assistant", "content": "sure"})
        messages.append({"role": "user", "content": t})
    return {"model": "auto", "messages": messages, "max_tokens": 4000}


def test_an_escalated_conversation_stays_up_until_its_time_runs_out() -> None:
    clock = Clock()
    tiers = Tiers(parse_config(TIERED), clock=clock)
    first = tiers.decide("auto", "app", Caller(), "chat", conversation(HARD), {})
    assert first.tier == "large"
    tiers.remember(first)
    clock.now += 30
    follow = tiers.decide("auto", "app", Caller(), "chat", conversation(HARD, "thanks"), {})
    assert (follow.tier, follow.reason) == ("large", "sticky")
    tiers.remember(follow)  # each escalated turn keeps it up for another sticky_s
    clock.now += 59
    assert tiers.decide("auto", "app", Caller(), "chat",
                        conversation(HARD, "thanks", "ok"), {}).reason == "sticky"
    # Another caller with the same words, another conversation: their own decision.
    other = tiers.decide("auto", "other-app", Caller(), "chat", conversation(HARD, "thanks"), {})
    assert other.reason != "sticky"
    other2 = tiers.decide("auto", "app", Caller(), "chat", conversation("hi", "thanks"), {})
    assert other2.tier == "small"
    clock.now += 61
    late = tiers.decide("auto", "app", Caller(), "chat", conversation(HARD, "thanks", "ok"), {})
    assert (late.tier, late.reason) == ("small", "none")


def test_sticky_keeps_no_text() -> None:
    tiers = Tiers(parse_config(TIERED), clock=Clock())
    secret = "my password is hunter2 " + HARD
    tiers.remember(tiers.decide("auto", "app", Caller(), "chat", conversation(secret), {}))
    kept = repr(tiers._sticky)
    assert "hunter2" not in kept and len(tiers._sticky) == 1


# -- the plug-in -------------------------------------------------------------------------

def plugin_high(view: RequestView) -> float:
    return 0.99 if view.user_turns else 0.0


def plugin_raises(view: RequestView) -> float:
    raise RuntimeError("model file missing")


def plugin_slow(view: RequestView) -> float:
    time.sleep(0.5)
    return 1.0


def plugin_bad(view: RequestView) -> float:
    return 7.0


def tiered_with_plugin(name: str) -> Tiers:
    text = TIERED + f"    scorer: {{plugin: 'tests.unit.test_tiers:{name}', timeout_ms: 50}}\n"
    return Tiers(parse_config(text))


def test_a_plugin_scorer_decides() -> None:
    d = tiered_with_plugin("plugin_high").decide("auto", "a", Caller(), "chat", chat(), {})
    assert (d.tier, d.scorer, d.score) == ("large", "tests.unit.test_tiers:plugin_high", 0.99)


@pytest.mark.parametrize(("name", "why"), [
    ("plugin_raises", "RuntimeError: model file missing"),
    ("plugin_slow", "no answer within 50 ms"),
    ("plugin_bad", "returned 7.0, not a number in [0, 1]"),
])
def test_a_failing_plugin_falls_back_to_the_default_with_a_logged_reason(
        name: str, why: str, caplog: pytest.LogCaptureFixture) -> None:
    tiers = tiered_with_plugin(name)
    with caplog.at_level(logging.WARNING, "spillover.tiers"):
        t0 = time.monotonic()
        d = tiers.decide("auto", "a", Caller(), "chat", chat(), {})
        assert time.monotonic() - t0 < 0.4  # bounded by timeout_ms, not the plug-in
    assert d.tier == "small" and why in d.scorer and d.scorer.startswith("default")
    assert why in caplog.text


def test_a_plugin_that_does_not_load_fails_the_start() -> None:
    text = TIERED + "    scorer: {plugin: 'tests.unit.test_tiers:nothing_here'}\n"
    with pytest.raises(ValueError, match="cannot be loaded"):
        Tiers(parse_config(text))


# -- cascade triggers ---------------------------------------------------------------------

def answer(content: str | None = "ok", finish: str = "stop", tool_calls: Any = None,
           completion_tokens: int = 5) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    return {"choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": completion_tokens}}


PERSON = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}


def call(name: str, args: str) -> list[dict[str, Any]]:
    return [{"id": "a", "type": "function", "function": {"name": name, "arguments": args}}]


@pytest.mark.parametrize(("request_body", "ans", "trigger"), [
    (chat(response_format=PERSON), answer('{"name": "Ada"}'), None),
    (chat(response_format=PERSON), answer('{"age": 3}'), "json-schema"),
    (chat(response_format=PERSON), answer("not json at all"), "json-schema"),
    (chat(response_format={"type": "json_object"}), answer("prose"), None),
    (chat(tools=[TOOL]), answer(None, tool_calls=call("f", '{"a": 1}')), None),
    (chat(tools=[TOOL]), answer(None, tool_calls=call("f", '{"a": 1')), "tool-args"),
    (chat(tools=[TOOL]), answer(None, tool_calls=call("rm_rf", "{}")), "tool-unknown"),
    (chat(max_tokens=100), answer("...", "length", completion_tokens=40), "length"),
    (chat(max_tokens=100), answer("...", "length", completion_tokens=100), None),
    (chat(), answer("...", "length", completion_tokens=4096), "length"),
])
def test_cascade_triggers(request_body: dict[str, Any], ans: dict[str, Any],
                          trigger: str | None) -> None:
    assert cascade_trigger(Cascade(), request_body, ans) == trigger


def test_each_trigger_can_be_turned_off() -> None:
    off = Cascade(json_schema=False, tool_calls=False, length=False)
    assert cascade_trigger(off, chat(response_format=PERSON), answer("x")) is None
    assert cascade_trigger(off, chat(tools=[TOOL]),
                           answer(None, tool_calls=call("zz", "{"))) is None
    assert cascade_trigger(Cascade(enabled=False), chat(response_format=PERSON),
                           answer("x")) is None


def message(*blocks: dict[str, Any], stop: str = "end_turn",
            output_tokens: int = 5) -> dict[str, Any]:
    """An Anthropic Message, as Claude answers a Messages request passed through."""
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": list(blocks), "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": output_tokens}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def tool_use(name: str, args: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": "toolu_1", "name": name, "input": args}


def response(*items: dict[str, Any], cut: bool = False,
             output_tokens: int = 5) -> dict[str, Any]:
    """An OpenAI Response (an engine's own /v1/responses)."""
    out: dict[str, Any] = {"id": "resp_1", "object": "response", "output": list(items),
                           "status": "incomplete" if cut else "completed",
                           "usage": {"input_tokens": 3, "output_tokens": output_tokens}}
    if cut:
        out["incomplete_details"] = {"reason": "max_output_tokens"}
    return out


def output_text(t: str) -> dict[str, Any]:
    return {"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": t, "annotations": []}]}


def function_call(name: str, args: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": "c1", "name": name, "arguments": args}


@pytest.mark.parametrize(("request_body", "ans", "trigger"), [
    # A Messages request passed through natively to Claude: its Message, read as such.
    (chat(tools=[TOOL]), message(tool_use("f", {"a": 1}), stop="tool_use"), None),
    (chat(tools=[TOOL]), message(tool_use("rm_rf", {}), stop="tool_use"), "tool-unknown"),
    (chat(tools=[TOOL]), message(tool_use("f", "{not an object"), stop="tool_use"),
     "tool-args"),
    (chat(response_format=PERSON), message(text('{"name": '), text('"Ada"}')), None),
    (chat(response_format=PERSON), message(text("prose")), "json-schema"),
    (chat(max_tokens=100), message(text("..."), stop="max_tokens", output_tokens=40),
     "length"),
    (chat(max_tokens=100), message(text("..."), stop="max_tokens", output_tokens=100), None),
    (chat(max_tokens=100), message(text("fine"), output_tokens=40), None),
    # An OpenAI Response.
    (chat(tools=[TOOL]), response(function_call("f", '{"a": 1}')), None),
    (chat(tools=[TOOL]), response(function_call("f", '{"a": 1')), "tool-args"),
    (chat(tools=[TOOL]), response(function_call("zz", "{}")), "tool-unknown"),
    (chat(response_format=PERSON), response(output_text('{"name": "Ada"}')), None),
    (chat(response_format=PERSON), response(output_text('{"age": 3}')), "json-schema"),
    (chat(max_tokens=100), response(output_text("..."), cut=True, output_tokens=40),
     "length"),
])
def test_cascade_reads_the_answer_in_the_api_it_came_back_in(
        request_body: dict[str, Any], ans: dict[str, Any], trigger: str | None) -> None:
    assert cascade_trigger(Cascade(), request_body, ans) == trigger


def test_an_answer_the_checks_cannot_read_is_skipped_with_a_logged_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "spillover.tiers"):
        assert cascade_trigger(Cascade(), chat(response_format=PERSON),
                               {"object": "something.else", "data": []}) is None
    assert "not checked" in caplog.text and "something.else" in caplog.text


def test_view_is_json_safe_for_plugins() -> None:
    view = view_of("chat", chat("hi", tools=[TOOL]))
    assert json.loads(json.dumps(dict(view.body)))["tools"][0]["function"]["name"] == "f"

"""Which tier of a tiered alias a request deserves: scored before the call, escalated
after it when the answer itself says the lower tier failed (the cascade).

The default scorer reads a handful of features a reviewer can check by eye, each a value
from 0 to 1 times its weight from models.yaml; the score is their sum, capped at 1. It
reads the parsed body only (no network, no model), the last user message's text at most
_SCAN_CHARS, so its cost does not grow with the conversation's length.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import orjson

from router.config import Alias, Caller, Cascade, Config, Scorer
from router.errors import Forbidden, InvalidRequest

log = logging.getLogger("spillover.tiers")

_SCAN_CHARS = 4000  # of the last user message (its end), for markers and code fences
_STICKY_MAX = 100_000  # conversations remembered at once; the oldest go first
_LOG_EVERY_S = 60.0  # a failing plug-in is said at most this often (with a count)

# Reasoning and multi-step markers: each kind counts once, whatever its repeats. Plain
# substrings of the lower-cased text (a regex of word boundaries over 8,000 characters
# cost over a millisecond); a leading space keeps "plan" out of "explain".
_MARKERS: tuple[tuple[str, ...], ...] = (
    ("step by step", "step-by-step"),
    ("prove", "proof", "derive", "derivation", "theorem"),
    ("analyse", "analyze", "analysis", "evaluate", "critique"),
    ("compare", "trade-off", "tradeoff", "pros and cons"),
    ("why", "explain", "reason"),
    (" plan", " design", "architect", "strategy"),
    (" then ", "afterwards", "finally", "\n1.", "\n2.", "\n- "),
)
_WORDS = re.compile(r"(\d{3,5})\s*(?:words|tokens)")
_LONG = ("in detail", "detailed", "comprehensive", "thorough", "exhaustive", "essay")

FEATURES = ("prompt_tokens", "conversation_depth", "tools", "response_schema",
            "code_blocks", "reasoning", "requested_length")


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a scorer is given: the parsed body (read only) and what was counted of it.
    A plug-in scorer gets the same view."""

    endpoint: str
    body: Mapping[str, Any]
    prompt_tokens: int  # message text / 4, tool definitions excluded
    user_turns: int
    tool_count: int
    response_format: str | None  # "json_schema" (with a schema), "json_object", None
    max_tokens: int | None
    last_user_text: str  # at most _SCAN_CHARS, its end


def view_of(endpoint: str, body: Mapping[str, Any]) -> RequestView:
    chars = turns = 0
    last = ""
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            text = _text(msg.get("content"))
            chars += len(text)
            if msg.get("role") == "user":
                turns += 1
                last = text
    else:
        prompt = body.get("prompt", body.get("input"))
        last = prompt if isinstance(prompt, str) else ""
        chars, turns = len(last), 1
    tools = body.get("tools")
    fmt = body.get("response_format")
    kind: str | None = None
    if isinstance(fmt, dict):
        t = fmt.get("type")
        schema = fmt.get("json_schema")
        if t == "json_schema" and isinstance(schema, dict) and schema.get("schema"):
            kind = "json_schema"
        elif t in ("json_object", "json_schema"):
            kind = "json_object"
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    return RequestView(
        endpoint=endpoint, body=body, prompt_tokens=chars // 4, user_turns=turns,
        tool_count=len(tools) if isinstance(tools, list) else 0, response_format=kind,
        max_tokens=mt if isinstance(mt, int) and not isinstance(mt, bool) else None,
        last_user_text=last[-_SCAN_CHARS:])


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def features(view: RequestView, scorer: Scorer) -> dict[str, float]:
    """Each feature's value, from 0 to 1."""
    s = scorer.scales
    text = view.last_user_text
    low = "\n" + text.lower()
    markers = sum(1 for kind in _MARKERS if any(m in low for m in kind))
    length = (view.max_tokens or 0) / s.requested_length
    if ("words" in low or "tokens" in low) and (words := _WORDS.search(low)) is not None:
        length = max(length, int(words.group(1)) * 4 / 3 / s.requested_length)
    if any(m in low for m in _LONG):
        length = max(length, 0.5)
    return {
        "prompt_tokens": min(1.0, view.prompt_tokens / s.prompt_tokens),
        "conversation_depth": min(1.0, max(0, view.user_turns - 1) / s.conversation_depth),
        "tools": min(1.0, view.tool_count / s.tools),
        "response_schema": {"json_schema": 1.0, "json_object": 0.5}.get(
            view.response_format or "", 0.0),
        "code_blocks": min(1.0, (text.count("```") // 2) / s.code_blocks),
        "reasoning": min(1.0, markers / s.reasoning),
        "requested_length": min(1.0, length),
    }


def default_score(view: RequestView, scorer: Scorer) -> tuple[float, dict[str, dict[str, float]]]:
    """The score and, per feature, its value and what it contributed."""
    values = features(view, scorer)
    w = scorer.weights
    parts = {name: {"value": round(v, 4), "weight": getattr(w, name),
                    "contribution": round(v * getattr(w, name), 4)}
             for name, v in values.items()}
    total = sum(v * getattr(w, name) for name, v in values.items())
    return min(1.0, total), parts


class PluginRunner:
    """Calls a plug-in scorer on one worker thread and waits at most its timeout: a scorer
    that hangs costs each request its timeout once, then none while it is still busy."""

    def __init__(self, fn: Callable[[RequestView], float], timeout_s: float) -> None:
        self._fn = fn
        self._timeout_s = timeout_s
        self._jobs: queue.SimpleQueue[tuple[RequestView, _Slot]] = queue.SimpleQueue()
        self._busy = threading.Lock()
        threading.Thread(target=self._work, name="spillover-tier-scorer", daemon=True).start()

    def _work(self) -> None:
        while True:
            view, slot = self._jobs.get()
            try:
                slot.value = self._fn(view)
            except Exception as exc:  # a plug-in's failure is reported, never raised
                slot.error = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                slot.done.set()
                self._busy.release()

    def score(self, view: RequestView) -> tuple[float | None, str | None]:
        if not self._busy.acquire(blocking=False):
            return None, "still busy with an earlier request"
        slot = _Slot()
        self._jobs.put((view, slot))
        if not slot.done.wait(self._timeout_s):
            return None, f"no answer within {self._timeout_s * 1000:g} ms"
        if slot.error is not None:
            return None, slot.error
        v = slot.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            return None, f"returned {v!r}, not a number in [0, 1]"
        return float(v), None


@dataclass(slots=True)
class _Slot:
    done: threading.Event = field(default_factory=threading.Event)
    value: object = None
    error: str | None = None


def load_plugin(spec: str) -> Callable[[RequestView], float]:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"tier scorer plug-in {spec!r} cannot be loaded: {exc}") from None
    if not callable(fn):
        raise ValueError(f"tier scorer plug-in {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class TierDecision:
    tiered: str  # the alias the caller named
    index: int  # 0: the everyday tier
    tier: str  # the plain alias of that tier
    score: float
    reason: str  # none | score | sticky | pinned | capped | lower | cascade-<trigger>
    scorer: str  # "default", the plug-in's name, or why the plug-in was not used
    parts: Mapping[str, Mapping[str, float]]
    thresholds: tuple[float, ...]
    scored_index: int  # what the score alone gave
    sticky_key: str | None = None

    def header(self) -> str:
        return f"{self.reason}; score={self.score:.3f}"


class Tiers:
    """Every tiered alias of a config: scoring, pins and caps, sticky conversations."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self._aliases: dict[str, Alias] = {n: a for n, a in config.aliases.items()
                                           if a.tiers is not None}
        self._clock = clock
        self._plugins: dict[str, tuple[str, PluginRunner]] = {}
        for name, alias in self._aliases.items():
            spec = alias.scorer.plugin
            if spec is not None:  # loaded at start: a bad name fails the start, not a call
                self._plugins[name] = (spec, PluginRunner(load_plugin(spec),
                                                          alias.scorer.timeout_ms / 1000))
        self._sticky: dict[str, tuple[int, float]] = {}
        self._failures: dict[str, tuple[float, int]] = {}  # alias -> (last logged, count)

    def __contains__(self, alias: str) -> bool:
        return alias in self._aliases

    def alias(self, name: str) -> Alias:
        return self._aliases[name]

    def decide(self, name: str, caller: str, policy: Caller, endpoint: str,
               body: Mapping[str, Any], headers: Mapping[str, str]) -> TierDecision:
        alias = self._aliases[name]
        tiers = alias.tiers or []
        view = view_of(endpoint, body)
        score, parts = default_score(view, alias.scorer)
        used = "default"
        if (plugin := self._plugins.get(name)) is not None:
            spec, runner = plugin
            value, why = runner.score(view)
            if value is None:
                used = f"default (plug-in {spec} failed: {why})"
                self._plugin_failed(name, spec, why or "")
            else:
                score, used = value, spec
        thresholds = tuple(alias.thresholds)
        scored = sum(1 for t in thresholds if score >= t)
        index, reason = scored, "score" if scored else "none"
        key = None
        if alias.sticky_s > 0:
            key = _conversation_key(caller, name, body)
            held = None if key is None else self._sticky.get(key)
            if held is not None and held[1] > self._clock() and held[0] > index:
                index, reason = held[0], "sticky"
        pin = headers.get("x-spillover-tier")
        if pin is not None and pin.strip():
            if not policy.may_pin_tier:
                raise Forbidden(f"caller '{caller}' may not pin a tier", param="x-spillover-tier",
                                code="tier_pin_not_allowed")
            index, reason = _pinned(pin.strip(), tiers), "pinned"
        if policy.max_tier is not None and index > policy.max_tier - 1:
            index, reason = policy.max_tier - 1, "capped"
        return TierDecision(name, index, tiers[index], score, reason, used, parts,
                            thresholds, scored, key)

    def lowered(self, d: TierDecision, index: int) -> TierDecision:
        """The decision moved down to a tier that can serve the request."""
        tiers = self._aliases[d.tiered].tiers or []
        return _replace(d, index=index, tier=tiers[index], reason="lower")

    def next_up(self, d: TierDecision, policy: Caller) -> TierDecision | None:
        """The tier a cascade re-sends to: one up, within the caller's cap; None if none."""
        tiers = self._aliases[d.tiered].tiers or []
        top = len(tiers) - 1 if policy.max_tier is None else min(len(tiers), policy.max_tier) - 1
        if d.index >= top:
            return None
        return _replace(d, index=d.index + 1, tier=tiers[d.index + 1], reason="cascade")

    def remember(self, d: TierDecision) -> None:
        """A request went to tier d.index: its conversation stays at least there."""
        if d.sticky_key is None or d.index == 0:
            return
        ttl = self._aliases[d.tiered].sticky_s
        held = self._sticky.pop(d.sticky_key, None)
        now = self._clock()
        index = d.index if held is None or held[1] <= now else max(d.index, held[0])
        self._sticky[d.sticky_key] = (index, now + ttl)
        if len(self._sticky) > _STICKY_MAX:
            self._sticky.pop(next(iter(self._sticky)))  # the least recently escalated

    def cascade(self, name: str) -> Cascade:
        return self._aliases[name].cascade

    def _plugin_failed(self, name: str, spec: str, why: str) -> None:
        last, count = self._failures.get(name, (-_LOG_EVERY_S, 0))
        now = time.monotonic()
        if now - last >= _LOG_EVERY_S:
            log.warning("tier scorer plug-in %s of %s failed (%s); the default scorer decided"
                        " (%d more failures since the last line)", spec, name, why, count)
            self._failures[name] = (now, 0)
        else:
            self._failures[name] = (last, count + 1)


def _replace(d: TierDecision, **changes: Any) -> TierDecision:
    values = {f: getattr(d, f) for f in TierDecision.__slots__}
    values.update(changes)
    return TierDecision(**values)


def _pinned(pin: str, tiers: list[str]) -> int:
    if pin in tiers:
        return tiers.index(pin)
    if pin.isdigit() and 1 <= int(pin) <= len(tiers):
        return int(pin) - 1
    raise InvalidRequest(f"x-spillover-tier must name a tier of this alias ({', '.join(tiers)})"
                         f" or its number from 1 to {len(tiers)}", param="x-spillover-tier")


def _conversation_key(caller: str, alias: str, body: Mapping[str, Any]) -> str | None:
    """A digest of the caller and the conversation's opening (its messages up to the first
    user message): the same for every turn of one conversation; no text is kept."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    opening = []
    for msg in messages:
        opening.append(msg)
        if isinstance(msg, dict) and msg.get("role") == "user":
            break
    try:
        raw = orjson.dumps(opening)
    except TypeError:
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(caller.encode() + b"\0" + alias.encode() + b"\0" + raw)
    return h.hexdigest()


# -- cascade triggers -------------------------------------------------------------------


def cascade_trigger(cfg: Cascade, request: Mapping[str, Any],
                    answer: Mapping[str, Any]) -> str | None:
    """Why the answer shows its tier failed, or None. Triggers: "json-schema" (the answer
    does not validate against response_format's schema), "tool-args" (tool arguments that
    are not JSON) and "tool-unknown" (a tool not offered), "length" (cut off at
    finish_reason length before the max_tokens the caller asked for).

    `request` is the chat completions body routed; `answer` is read in the API it came
    back in: a chat completion, an Anthropic Message (a Messages request passed through
    natively to Claude) or an OpenAI Response (an engine's own /v1/responses). An answer
    in none of these shapes is not checked, and the log says so."""
    if not cfg.enabled:
        return None
    choices = answer.get("choices")
    if not isinstance(choices, list):
        as_chat = _as_chat(answer)
        if as_chat is None:
            _unchecked(answer)
            return None
        answer = as_chat
        choices = as_chat["choices"]
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        if cfg.length and choice.get("finish_reason") == "length":
            asked = request.get("max_tokens", request.get("max_completion_tokens"))
            usage = answer.get("usage")
            used = usage.get("completion_tokens") if isinstance(usage, dict) else None
            if not isinstance(asked, int) or not isinstance(used, int) or used < asked:
                return "length"
        if cfg.tool_calls and (why := _tool_problem(request, message)) is not None:
            return why
        if cfg.json_schema and _schema_fails(request, message):
            return "json-schema"
    return None


def _tool_problem(request: Mapping[str, Any], message: Mapping[str, Any]) -> str | None:
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return None
    tools = request.get("tools")
    offered = {t["function"].get("name") for t in tools if isinstance(t, dict)
               and isinstance(t.get("function"), dict)} if isinstance(tools, list) else set()
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            return "tool-args"
        if fn.get("name") not in offered:
            return "tool-unknown"
        args = fn.get("arguments")
        try:
            if not isinstance(args, str) or not isinstance(orjson.loads(args), dict):
                return "tool-args"
        except orjson.JSONDecodeError:
            return "tool-args"
    return None


def _schema_fails(request: Mapping[str, Any], message: Mapping[str, Any]) -> bool:
    fmt = request.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return False
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        return False
    content = message.get("content")
    if not isinstance(content, str):
        return True
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return True
    try:
        validator = jsonschema.validators.validator_for(schema)
        validator(schema).validate(data)
    except jsonschema.ValidationError:
        return True
    except jsonschema.SchemaError:
        return False  # the caller's schema is broken: nothing a bigger model can fix
    return False


def _as_chat(answer: Mapping[str, Any]) -> dict[str, Any] | None:
    """An Anthropic Message or an OpenAI Response as the chat completion the checks read
    (one choice: its text, its tool calls with JSON arguments, its finish reason, the
    output tokens); None for any other shape."""
    if answer.get("type") == "message" and isinstance(answer.get("content"), list):
        text, calls = [], []
        for block in answer["content"]:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif block.get("type") == "tool_use":
                args = block.get("input")
                calls.append({"type": "function", "function": {
                    "name": block.get("name"),
                    # Claude sends the arguments parsed: an object, or nothing usable.
                    "arguments": orjson.dumps(args).decode() if isinstance(args, dict)
                    else None}})
        finish = {"max_tokens": "length", "tool_use": "tool_calls"}.get(
            str(answer.get("stop_reason")), "stop")
        return _chat(text, calls, finish, _output_tokens(answer, "output_tokens"))
    if answer.get("object") == "response" and isinstance(answer.get("output"), list):
        text, calls = [], []
        for item in answer["output"]:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message" and isinstance(item.get("content"), list):
                text.extend(p["text"] for p in item["content"] if isinstance(p, dict)
                            and p.get("type") == "output_text"
                            and isinstance(p.get("text"), str))
            elif item.get("type") == "function_call":
                calls.append({"type": "function", "function": {
                    "name": item.get("name"), "arguments": item.get("arguments")}})
        details = answer.get("incomplete_details")
        cut = (answer.get("status") == "incomplete" and isinstance(details, dict)
               and details.get("reason") == "max_output_tokens")
        return _chat(text, calls, "length" if cut else "stop",
                     _output_tokens(answer, "output_tokens"))
    return None


def _chat(text: list[str], calls: list[dict[str, Any]], finish: str,
          output_tokens: int | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None}
    if calls:
        message["tool_calls"] = calls
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"completion_tokens": output_tokens}}


def _output_tokens(answer: Mapping[str, Any], key: str) -> int | None:
    usage = answer.get("usage")
    n = usage.get(key) if isinstance(usage, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _unchecked(answer: Mapping[str, Any]) -> None:
    kind = answer.get("object", answer.get("type"))
    log.info("tier cascade: an answer of a shape the checks do not read (%s) was not "
             "checked", str(kind)[:40] if isinstance(kind, str) else type(kind).__name__)

"""Tool-call ids: Mistral (La Plateforme, and Mistral chat templates on local engines)
accepts only ids of exactly nine characters of [a-zA-Z0-9]; callers' ids are mapped
there on the way up and back on the way down."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

_ID_OK = re.compile(r"[a-zA-Z0-9]{9}\Z")
_B62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(slots=True)
class IdMap:
    """Tool-call ids as the upstream saw them -> as the caller sent them."""

    back: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.back)


def mistral_tool_id(original: str) -> str:
    """A stable 9-character id for any caller id: the same input maps the same way in
    every turn of a conversation, so no state has to be kept between requests."""
    if _ID_OK.match(original):
        return original
    n = int.from_bytes(hashlib.sha256(original.encode()).digest()[:8], "big")
    out = []
    for _ in range(9):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(out)


def rewrite_message_ids(body: dict[str, Any], ids: IdMap) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    new_messages: list[Any] | None = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        fixed = _fix_message(msg, ids)
        if fixed is not msg:
            if new_messages is None:
                new_messages = list(messages)
            new_messages[i] = fixed
    if new_messages is not None:
        body["messages"] = new_messages


def _fix_message(msg: dict[str, Any], ids: IdMap) -> dict[str, Any]:
    out = msg
    tcid = msg.get("tool_call_id")
    if isinstance(tcid, str) and not _ID_OK.match(tcid):
        out = dict(msg)
        out["tool_call_id"] = _mapped(tcid, ids)
    calls = msg.get("tool_calls")
    if isinstance(calls, list) and any(
        isinstance(c, dict) and isinstance(c.get("id"), str) and not _ID_OK.match(c["id"])
        for c in calls
    ):
        if out is msg:
            out = dict(msg)
        out["tool_calls"] = [
            {**c, "id": _mapped(c["id"], ids)}
            if isinstance(c, dict) and isinstance(c.get("id"), str) else c
            for c in calls
        ]
    return out


def _mapped(original: str, ids: IdMap) -> str:
    new = mistral_tool_id(original)
    ids.back[new] = original
    return new


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

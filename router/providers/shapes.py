"""Small shapes the API translators (Messages, Responses, Anthropic upstream) share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError

from router.errors import InvalidRequest


def arguments_object(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments (chat sends them as a JSON string) as an object; {} when
    they are not one (a model's broken JSON is not the caller's error)."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str) and arguments.strip():
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def text_only(content: Any, part_type: str, at: str,
              bad_part: Callable[[int], InvalidRequest],
              bad_content: Callable[[], InvalidRequest]) -> str:
    """A tool result's content (a string or parts of `part_type` with text) as one text,
    lines joined; each API words its own refusals (`bad_part(k)`, `bad_content()`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == part_type
                    and isinstance(part.get("text"), str)):
                raise bad_part(k)
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_content()


def integral(value: Any) -> Any:
    """An integer written as a float (`30.0`) as the int it is; anything else as it came.

    Both Anthropic's and OpenAI's request validation are pydantic's, whose lax mode takes
    a float with no fractional part for an integer field and refuses `30.5`; JSON Schema
    (the published contract) also counts `30.0` as an integer. Strings and booleans stay
    refused: the models that use this validate strictly otherwise."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def first_error(exc: ValidationError, body: Any) -> tuple[str, list[str | int], str]:
    """The error of a request model's validation to tell the caller: its pydantic type,
    the path to the field in the caller's body and the message. Pydantic's location names
    the union members it tried (`str`, a tag, `list[...]`) between the body's keys: those
    steps are dropped by walking the body itself, so the path is what the caller sent.
    Of a union's errors the deepest is the one meant (`content.1.is_error`, not that
    `content` is no string)."""
    best: tuple[str, list[str | int], str] | None = None
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = err["loc"]
        path: list[str | int] = []
        node = body
        for n, step in enumerate(loc):
            inside = (isinstance(node, dict) and isinstance(step, str) and step in node) or (
                isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node))
            if inside:
                node = node[step]  # a key of a dict, an index of a list
                path.append(step)
            elif n == len(loc) - 1 and err["type"] == "missing" and isinstance(step, str):
                path.append(step)  # a required field: named though absent from the body
        if best is None or len(path) > len(best[1]):
            best = (err["type"], path, err["msg"])
    assert best is not None  # a ValidationError has at least one error
    return best


def event_data(event: bytes) -> dict[str, Any] | None:
    """The JSON object of one whole event's `data:` line (None when it has none or it is
    not an object); an `event:` line before it, as Anthropic and Responses send, is
    skipped."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                data = orjson.loads(line[5:].strip())
            except orjson.JSONDecodeError:
                return None
            return data if isinstance(data, dict) else None
    return None

"""Small shapes the API translators (Messages, Responses, Anthropic upstream) share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

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

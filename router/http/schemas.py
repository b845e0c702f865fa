"""The OpenAPI documents of the request bodies the gateway takes, close to OpenAI's own.

FastAPI never parses these bodies (router/http/inbound.py reads each once, raw); the schemas
are the published contract: what clients generate code from and what the fuzz tests
check the gateway against. Each constant is one route's `openapi_extra`: its request
body and its responses, every error in OpenAI's shape.

Unknown fields are allowed everywhere: they pass through to vLLM, which has many
(`top_k`, `min_p`, `guided_json`, `chat_template_kwargs` ...).
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _or_null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _number(minimum: float, maximum: float) -> Schema:
    return _or_null({"type": "number", "minimum": minimum, "maximum": maximum})


_TOKENS = _or_null({"type": "integer", "minimum": 1, "maximum": _INT64_MAX})
_STRINGS: Schema = {"type": "array", "minItems": 1, "items": {"type": "string"}}
_TOKEN_IDS: Schema = {"type": "array", "minItems": 1,
                      "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}

_SAMPLING: dict[str, Schema] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "n": _or_null({"type": "integer", "minimum": 1, "maximum": 128}),
    "max_tokens": _TOKENS,
    "stop": _or_null({"anyOf": [{"type": "string"},
                                {"type": "array", "maxItems": 4, "items": {"type": "string"}}]}),
    "seed": _or_null({"type": "integer", "minimum": _INT64_MIN, "maximum": _INT64_MAX}),
    "stream": _or_null({"type": "boolean"}),
    "stream_options": _or_null({
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
    }),
    "logit_bias": _or_null({
        "type": "object",
        "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100},
    }),
    "user": {"type": "string"},
}

_MODEL: Schema = {"type": "string", "minLength": 1,
                  "description": "An alias this gateway serves (GET /v1/models)."}

# --- chat ---------------------------------------------------------------------------

_TEXT_PART: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_IMAGE_PART: Schema = {
    "type": "object",
    "required": ["type", "image_url"],
    "properties": {
        "type": {"const": "image_url"},
        "image_url": {
            "type": "object",
            "required": ["url"],
            "properties": {"url": {"type": "string"},
                           "detail": {"enum": ["auto", "low", "high"]}},
        },
    },
}
_AUDIO_PART: Schema = {
    "type": "object",
    "required": ["type", "input_audio"],
    "properties": {
        "type": {"const": "input_audio"},
        "input_audio": {
            "type": "object",
            "required": ["data", "format"],
            "properties": {"data": {"type": "string"}, "format": {"enum": ["wav", "mp3"]}},
        },
    },
}
_TEXT_CONTENT: Schema = {"anyOf": [
    {"type": "string"},
    {"type": "array", "minItems": 1, "items": _TEXT_PART},
]}
_USER_CONTENT: Schema = {"anyOf": [
    {"type": "string"},
    {"type": "array", "minItems": 1,
     "items": {"oneOf": [_TEXT_PART, _IMAGE_PART, _AUDIO_PART]}},
]}
_TOOL_CALL: Schema = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}


def _message(role: str, content: Schema, *, required: tuple[str, ...] = ("content",),
             **extra: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["role", *required],
        "properties": {"role": {"const": role}, "content": content,
                       "name": {"type": "string"}, **extra},
    }


_MESSAGE: Schema = {"oneOf": [
    _message("developer", _TEXT_CONTENT),
    _message("system", _TEXT_CONTENT),
    _message("user", _USER_CONTENT),
    _message("assistant", _or_null(_TEXT_CONTENT), required=(),
             tool_calls={"type": "array", "items": _TOOL_CALL},
             refusal=_or_null({"type": "string"})),
    _message("tool", _TEXT_CONTENT, required=("content", "tool_call_id"),
             tool_call_id={"type": "string"}),
]}
_FUNCTION_NAME: Schema = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
_TOOL: Schema = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": _FUNCTION_NAME,
                "description": {"type": "string"},
                "parameters": {"type": "object"},
                "strict": _or_null({"type": "boolean"}),
            },
        },
    },
}
_TOOL_CHOICE: Schema = {"anyOf": [
    {"enum": ["none", "auto", "required"]},
    {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"],
                         "properties": {"name": _FUNCTION_NAME}},
        },
    },
]}
_RESPONSE_FORMAT: Schema = {"oneOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}},
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "json_object"}}},
    {
        "type": "object",
        "required": ["type", "json_schema"],
        "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": _FUNCTION_NAME, "description": {"type": "string"},
                               "schema": {"type": "object"},
                               "strict": _or_null({"type": "boolean"})},
            },
        },
    },
]}

CHAT_REQUEST: Schema = {
    "type": "object",
    "title": "CreateChatCompletionRequest",
    "required": ["model", "messages"],
    "properties": {
        "model": _MODEL,
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        **_SAMPLING,
        "max_completion_tokens": _TOKENS,
        "tools": {"type": "array", "items": _TOOL},
        "tool_choice": _TOOL_CHOICE,
        "parallel_tool_calls": {"type": "boolean"},
        "response_format": _RESPONSE_FORMAT,
        "logprobs": _or_null({"type": "boolean"}),
        "top_logprobs": _or_null({"type": "integer", "minimum": 0, "maximum": 20}),
    },
}

# --- completions and embeddings -----------------------------------------------------

COMPLETION_REQUEST: Schema = {
    "type": "object",
    "title": "CreateCompletionRequest",
    "required": ["model", "prompt"],
    "properties": {
        "model": _MODEL,
        "prompt": {"anyOf": [
            {"type": "string"}, _STRINGS, _TOKEN_IDS,
            {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
        ]},
        "suffix": _or_null({"type": "string",
                            "description": "Text after the insertion point (fill-in-the-middle)."}),
        **_SAMPLING,
        "echo": _or_null({"type": "boolean"}),
        "best_of": _or_null({"type": "integer", "minimum": 1, "maximum": 20}),
        "logprobs": _or_null({"type": "integer", "minimum": 0, "maximum": 5}),
    },
}

EMBEDDING_REQUEST: Schema = {
    "type": "object",
    "title": "CreateEmbeddingRequest",
    "required": ["model", "input"],
    "properties": {
        "model": _MODEL,
        "input": {"anyOf": [
            {"type": "string"}, _STRINGS, _TOKEN_IDS,
            {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
        ]},
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
        "user": {"type": "string"},
    },
}

# --- responses ----------------------------------------------------------------------

ERROR: Schema = {
    "type": "object",
    "title": "ErrorResponse",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        },
    },
}
# For any route: every refusal and failure, in OpenAI's shape.
ERROR_RESPONSES: Schema = {
    "4XX": {"description": "The request was refused (OpenAI's error shape).",
            "content": {"application/json": {"schema": ERROR}}},
    "5XX": {"description": "The gateway or its upstreams failed (OpenAI's error shape).",
            "content": {"application/json": {"schema": ERROR}}},
}
# One server-sent event (OpenAPI 3.1 documents an event stream by its events): a chunk's
# JSON in `data`, then "[DONE]", or an error payload if the stream fails midway.
_SSE_EVENT: Schema = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}
_ANSWER: Schema = {
    "description": "The upstream's answer; an event stream when `stream` is true.",
    "content": {"application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": _SSE_EVENT}},
}


def _json_answer(description: str) -> Schema:
    return {"description": description,
            "content": {"application/json": {"schema": {"type": "object"}}}}


def _operation(request: Schema, answer: Schema) -> Schema:
    return {
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": request}}},
        "responses": {"200": answer, **ERROR_RESPONSES},
    }


CHAT_BODY: Schema = _operation(CHAT_REQUEST, _ANSWER)
COMPLETIONS_BODY: Schema = _operation(COMPLETION_REQUEST, _ANSWER)
EMBEDDINGS_BODY: Schema = _operation(EMBEDDING_REQUEST, _json_answer("The embeddings."))
EXPLAIN_BODY: Schema = _operation(
    CHAT_REQUEST, _json_answer("Where the chat completion would go now, and why."))

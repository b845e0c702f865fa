"""The OpenAPI documents of the request bodies the gateway takes, close to OpenAI's own.

FastAPI never parses these bodies (router/http/inbound.py reads each once, raw); the schemas
are the published contract: what clients generate code from and what the fuzz tests
check the gateway against. Each constant is one route's `openapi_extra`: its request
body and its responses, every error in OpenAI's shape.

Unknown fields are allowed in the OpenAI chat/completions/embeddings bodies: they pass
through to vLLM, which has many (`top_k`, `min_p`, `guided_json`, `chat_template_kwargs`
...). The Messages and Responses bodies refuse unknown top-level fields, as Anthropic
and OpenAI do (router/providers/anthropic.py, responses.py validate them).
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


# --- Anthropic Messages (POST /v1/messages, /v1/messages/count_tokens) ---------------
# As Anthropic documents them (https://docs.anthropic.com/en/api/messages); its errors
# in its own shape, 529 overloaded_error where an OpenAI client gets 503.

_ID: Schema = {"type": "string", "minLength": 1}
_A_TEXT: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_A_IMAGE: Schema = {
    "type": "object",
    "required": ["type", "source"],
    "properties": {
        "type": {"const": "image"},
        "source": {"oneOf": [
            {"type": "object", "required": ["type", "media_type", "data"],
             "properties": {"type": {"const": "base64"},
                            "media_type": {"enum": ["image/jpeg", "image/png", "image/gif",
                                                    "image/webp"]},
                            "data": {"type": "string"}}},
            {"type": "object", "required": ["type", "url"],
             "properties": {"type": {"const": "url"}, "url": {"type": "string"}}},
        ]},
    },
}
_A_TOOL_USE: Schema = {
    "type": "object",
    "required": ["type", "id", "name", "input"],
    "properties": {"type": {"const": "tool_use"}, "id": _ID,
                   "name": _ID, "input": {"type": "object"}},
}
_A_TOOL_RESULT: Schema = {
    "type": "object",
    "required": ["type", "tool_use_id"],
    "properties": {
        "type": {"const": "tool_result"}, "tool_use_id": _ID,
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _A_TEXT}]},
        "is_error": {"type": "boolean"},
    },
}


def _a_turn(role: str, *blocks: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"const": role},
            "content": {"anyOf": [{"type": "string"},
                                  {"type": "array", "minItems": 1,
                                   "items": {"oneOf": list(blocks)}}]},
        },
    }


# A tool_result answers the tool_use blocks of the assistant turn just before it, one
# for one (Anthropic refuses others; a schema cannot say so).
_A_MESSAGE: Schema = {"oneOf": [_a_turn("user", _A_TEXT, _A_IMAGE, _A_TOOL_RESULT),
                                _a_turn("assistant", _A_TEXT, _A_TOOL_USE)]}
_A_TOOL: Schema = {
    "type": "object",
    "required": ["name", "input_schema"],
    "properties": {"type": {"const": "custom"}, "name": _FUNCTION_NAME,
                   "description": {"type": "string"}, "input_schema": {"type": "object"}},
}
_A_TOOL_CHOICE: Schema = {"oneOf": [
    {"type": "object", "required": ["type"],
     "properties": {"type": {"enum": ["auto", "any", "none"]},
                    "disable_parallel_tool_use": {"type": "boolean"}}},
    {"type": "object", "required": ["type", "name"],
     "properties": {"type": {"const": "tool"}, "name": _FUNCTION_NAME,
                    "disable_parallel_tool_use": {"type": "boolean"}}},
]}
# Optional fields: null is taken as absent (as Anthropic's own validation does).
_A_PROMPT: dict[str, Schema] = {
    "model": _MODEL,
    "messages": {"type": "array", "minItems": 1, "items": _A_MESSAGE},
    "system": _or_null({"anyOf": [{"type": "string"}, {"type": "array", "items": _A_TEXT}]}),
    "tools": _or_null({"type": "array", "items": _A_TOOL}),
    "tool_choice": _or_null(_A_TOOL_CHOICE),
    # Read by nothing here (extended thinking goes to vLLM natively); typed all the same.
    "thinking": _or_null({"type": "object"}),
    "context_management": _or_null({"type": "object"}),
    "anthropic_version": _or_null({"type": "string"}),
    "betas": _or_null({"type": "array", "items": {"type": "string"}}),
}

MESSAGES_REQUEST: Schema = {
    "type": "object",
    "title": "CreateMessageParams",
    "required": ["model", "max_tokens", "messages"],
    "properties": {
        **_A_PROMPT,
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": _INT64_MAX},
        "stop_sequences": _or_null({"type": "array",
                                    "items": {"type": "string", "minLength": 1}}),
        "temperature": _number(0, 1),
        "top_p": _number(0, 1),
        "top_k": _or_null({"type": "integer", "minimum": 0}),
        "metadata": _or_null({"type": "object",
                              "properties": {"user_id": _or_null({"type": "string"})}}),
        "stream": _or_null({"type": "boolean"}),
        "service_tier": _or_null({"enum": ["auto", "standard_only"]}),
        "container": _or_null({"anyOf": [{"type": "string"}, {"type": "object"}]}),
    },
    "additionalProperties": False,  # Anthropic: "Extra inputs are not permitted"
}
COUNT_TOKENS_REQUEST: Schema = {
    "type": "object",
    "title": "CountMessageTokensParams",
    "required": ["model", "messages"],
    "properties": _A_PROMPT,
    "additionalProperties": False,
}
_A_USAGE: Schema = {
    "type": "object",
    "required": ["input_tokens", "output_tokens"],
    "properties": {"input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"}},
}
MESSAGE: Schema = {
    "type": "object",
    "title": "Message",
    "required": ["id", "type", "role", "content", "model", "stop_reason", "usage"],
    "properties": {
        "id": {"type": "string"}, "type": {"const": "message"},
        "role": {"const": "assistant"}, "model": {"type": "string"},
        "content": {"type": "array", "items": {"type": "object", "required": ["type"],
                                               "properties": {"type": {"type": "string"}}}},
        "stop_reason": _or_null({"type": "string"}),
        "stop_sequence": _or_null({"type": "string"}),
        "usage": _A_USAGE,
    },
}
ANTHROPIC_ERROR: Schema = {
    "type": "object",
    "title": "AnthropicErrorResponse",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"],
                  "properties": {"type": {"type": "string"},
                                 "message": {"type": "string", "minLength": 1}}},
    },
}
ANTHROPIC_ERROR_RESPONSES: Schema = {
    "4XX": {"description": "The request was refused (Anthropic's error shape).",
            "content": {"application/json": {"schema": ANTHROPIC_ERROR}}},
    "5XX": {"description": "The gateway or its upstreams failed (Anthropic's error shape; "
                           "529 overloaded_error where an OpenAI client gets 503).",
            "content": {"application/json": {"schema": ANTHROPIC_ERROR}}},
}


def _anthropic_operation(request: Schema, answer: Schema, description: str) -> Schema:
    return {
        "description": description,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": request}}},
        "responses": {"200": answer, **ANTHROPIC_ERROR_RESPONSES},
    }


MESSAGES_BODY: Schema = _anthropic_operation(
    MESSAGES_REQUEST,
    {"description": "The Message; Anthropic's event stream (message_start, "
                    "content_block_start/delta/stop, message_delta, message_stop, ping) "
                    "when `stream` is true.",
     "content": {"application/json": {"schema": MESSAGE},
                 "text/event-stream": {"schema": _SSE_EVENT}}},
    "Anthropic's Messages API, routed like a chat completion. The key as `x-api-key` "
    "or `Authorization: Bearer`; `anthropic-version` accepted.")
COUNT_TOKENS_BODY: Schema = _anthropic_operation(
    COUNT_TOKENS_REQUEST,
    {"description": "The prompt's input tokens: the alias's local engine's count, else "
                    "the gateway's estimate (`x-spillover-token-count` says which).",
     "content": {"application/json": {"schema": {
         "type": "object", "title": "MessageTokensCount", "required": ["input_tokens"],
         "properties": {"input_tokens": {"type": "integer", "minimum": 0}}}}}},
    "Anthropic's token counting for a Messages request; sends nothing off-site.")

# --- OpenAI Responses (POST /v1/responses), stateless --------------------------------

_R_TEXT_PART: Schema = {
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": {"type": "string"}},
}
_R_IMAGE_PART: Schema = {
    "type": "object", "required": ["type", "image_url"],
    "properties": {"type": {"const": "input_image"}, "image_url": _ID,
                   "detail": {"enum": ["auto", "low", "high"]}},
}


def _r_message(roles: list[str], *parts: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "type": {"const": "message"},
            "role": {"enum": roles},
            "content": {"anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"oneOf": list(parts)}},
            ]},
        },
    }


_R_MESSAGE_ITEM: Schema = {"oneOf": [
    _r_message(["user"], _R_TEXT_PART, _R_IMAGE_PART),
    _r_message(["assistant", "system", "developer"], _R_TEXT_PART),
]}
_R_FUNCTION_CALL: Schema = {
    "type": "object",
    "required": ["type", "call_id", "name", "arguments"],
    "properties": {"type": {"const": "function_call"}, "call_id": _ID,
                   "name": _ID, "arguments": {"type": "string"},
                   "id": {"type": "string"}},
}
_R_FUNCTION_OUTPUT: Schema = {
    "type": "object",
    "required": ["type", "call_id", "output"],
    "properties": {"type": {"const": "function_call_output"}, "call_id": _ID,
                   "output": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
                       "type": "object", "required": ["type", "text"],
                       "properties": {"type": {"const": "input_text"},
                                      "text": {"type": "string"}}}}]}},
}
_R_TOOL: Schema = {
    "type": "object",
    "required": ["type", "name"],
    "properties": {"type": {"const": "function"}, "name": _FUNCTION_NAME,
                   "description": _or_null({"type": "string"}),
                   "parameters": _or_null({"type": "object"}),
                   "strict": _or_null({"type": "boolean"})},
}
_R_FORMAT: Schema = {"oneOf": [
    {"type": "object", "required": ["type"],
     "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "name", "schema"],
     "properties": {"type": {"const": "json_schema"}, "name": _FUNCTION_NAME,
                    "schema": {"type": "object"}, "description": {"type": "string"},
                    "strict": _or_null({"type": "boolean"})}},
]}

RESPONSES_REQUEST: Schema = {
    "type": "object",
    "title": "CreateResponse",
    "description": "Stateless: `store` is treated as false; previous_response_id, "
                   "conversation, background and built-in tools are refused with a 400.",
    "required": ["model", "input"],
    "properties": {
        "model": _MODEL,
        "input": {"anyOf": [
            {"type": "string"},
            {"type": "array", "minItems": 1,
             "items": {"oneOf": [_R_MESSAGE_ITEM, _R_FUNCTION_CALL, _R_FUNCTION_OUTPUT]}},
        ]},
        "instructions": _or_null({"type": "string"}),
        "tools": _or_null({"type": "array", "items": _R_TOOL}),
        "tool_choice": _or_null({"anyOf": [
            {"enum": ["none", "auto", "required"]},
            {"type": "object", "required": ["type", "name"],
             "properties": {"type": {"const": "function"}, "name": {"type": "string"}}},
        ]}),
        "max_output_tokens": _TOKENS,
        "temperature": _number(0, 2),
        "top_p": _number(0, 1),
        "text": _or_null({"type": "object", "properties": {"format": _R_FORMAT}}),
        "stream": _or_null({"type": "boolean"}),
        "store": _or_null({"type": "boolean"}),
        "metadata": _or_null({"type": "object",
                              "additionalProperties": {"type": "string"}}),
        "parallel_tool_calls": _or_null({"type": "boolean"}),
        "user": _or_null({"type": "string"}),
        "safety_identifier": _or_null({"type": "string"}),
        # Documented, changing nothing here (OpenAI's own reasoning, caching, tiers).
        "reasoning": _or_null({"type": "object"}),
        "include": _or_null({"type": "array", "items": {"type": "string"}}),
        "truncation": _or_null({"enum": ["auto", "disabled"]}),
        "service_tier": _or_null({"enum": ["auto", "default", "flex", "scale", "priority"]}),
        "prompt_cache_key": _or_null({"type": "string"}),
        "prompt_cache_retention": _or_null({"enum": ["in-memory", "24h"]}),
        "top_logprobs": _or_null({"type": "integer", "minimum": 0, "maximum": 20}),
        "max_tool_calls": _or_null({"type": "integer", "minimum": 1, "maximum": _INT64_MAX}),
        "stream_options": _or_null({"type": "object"}),
    },
    # OpenAI: "Unknown parameter". The stateful fields (previous_response_id,
    # conversation, prompt, background) are refused with a reason when set.
    "additionalProperties": False,
}
RESPONSE: Schema = {
    "type": "object",
    "title": "Response",
    "required": ["id", "object", "status", "model", "output"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "response"},
        "status": {"type": "string"}, "model": {"type": "string"},
        "output": {"type": "array", "items": {"type": "object", "required": ["type"],
                                              "properties": {"type": {"type": "string"}}}},
        "usage": _or_null({"type": "object", "properties": {
            "input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"}}}),
    },
}
RESPONSES_BODY: Schema = {
    **_operation(RESPONSES_REQUEST, {
        "description": "The Response; its event stream (response.created, "
                       "response.output_item.added, response.output_text.delta, "
                       "response.function_call_arguments.delta, response.completed, ...) "
                       "when `stream` is true.",
        "content": {"application/json": {"schema": RESPONSE},
                    "text/event-stream": {"schema": _SSE_EVENT}}}),
    "description": "OpenAI's Responses API, stateless, routed like a chat completion.",
}

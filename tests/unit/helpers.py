"""Building configs and a mock upstream world for unit tests (no network)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import yaml

from router.config import Config, parse_config

LOCAL = "http://127.0.0.1:8101"
HOSTED = "https://api.mistral.test/v1"

BASE_YAML = f"""
server: {{request_timeout_s: 5, metrics_interval_s: 60, ledger_path: ":memory:"}}
providers:
  mistral: {{kind: mistral, base_url: "{HOSTED}", api_key_env: MISTRAL_API_KEY,
            timeouts: {{connect: 1, read: 2, write: 1, pool: 1}}}}
aliases:
  demo:
    local:
      - name: demo-local
        model: /models/demo
        license: apache-2.0
        served_model_name: demo
        port: 8101
        max_model_len: 2048
        saturation: {{max_waiting: 0, max_inflight: 4, resume_below: 0.5}}
    hosted:
      - provider: mistral
        model: mistral-small-latest
        price: {{input_per_mtok: 0.1, output_per_mtok: 0.3}}
"""


def config(yaml_text: str = BASE_YAML, **overrides: Any) -> Config:
    data = yaml.safe_load(yaml_text)
    data.update(overrides)
    return parse_config(yaml.safe_dump(data))


METRICS_IDLE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="demo"} %(waiting)s
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="demo"} %(kv)s
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="demo"} 1234.0
"""


def completion(model: str, content: str = "hi", tool_calls: list[Any] | None = None,
               usage: tuple[int, int] = (10, 5)) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {
        "id": "cmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                  "total_tokens": sum(usage)},
    }


def sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + \
        b"data: [DONE]\n\n"


def chunk(model: str, content: str | None = None, usage: tuple[int, int] | None = None,
          finish: str | None = None) -> dict[str, Any]:
    choices = [] if usage and content is None and finish is None else [
        {"index": 0, "delta": {"content": content} if content is not None else {},
         "finish_reason": finish}]
    out: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                           "model": model, "choices": choices}
    if usage:
        out["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                        "total_tokens": sum(usage)}
    return out


Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class World:
    """Local engine + La Plateforme as one MockTransport; tests flip their behaviour."""

    local_up: bool = True
    waiting: float = 0
    kv: float = 0.1
    local: Handler | None = None
    hosted: Handler | None = None
    seen: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    def bodies(self, where: str) -> list[dict[str, Any]]:
        return [b for w, _, b in self.seen if w == where]

    def _handle(self, req: httpx.Request) -> httpx.Response:
        url = str(req.url)
        if url.startswith(LOCAL):
            if not self.local_up:
                raise httpx.ConnectError("connection refused", request=req)
            path = req.url.path
            if path == "/health":
                return httpx.Response(200)
            if path == "/metrics":
                return httpx.Response(200, text=METRICS_IDLE % {"waiting": self.waiting,
                                                                "kv": self.kv})
            self.seen.append(("local", path, json.loads(req.content)))
            if self.local is not None:
                return self.local(req)
            return httpx.Response(200, json=completion("demo", "local answer"))
        if url.startswith(HOSTED):
            body = json.loads(req.content)
            self.seen.append(("hosted", req.url.path, body))
            if req.headers.get("authorization") != "Bearer sk-test-secret":
                return httpx.Response(401, json={"message": "Unauthorized"})
            if self.hosted is not None:
                return self.hosted(req)
            return httpx.Response(200, json=completion(body["model"], "hosted answer",
                                                       usage=(1000, 2000)))
        return httpx.Response(404)

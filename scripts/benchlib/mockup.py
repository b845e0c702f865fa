#!/usr/bin/env python3
"""A minimal, fast OpenAI-compatible upstream for benchmarks (raw asyncio + uvloop).

    python scripts/benchlib/mockup.py --port 9100 [--ttft-s 0.3 --ttft-jitter-s 0.2
                                                   --tok-per-s 50]

POST /v1/chat/completions (JSON or SSE stream, usage included), GET /health,
GET /metrics (vLLM's gauges at zero, so a router sees an idle, healthy engine), and
GET /stats (what it served). A request may carry `"mock": {"ttft_s", "interval_s",
"tokens"}` to override the timing for itself: the router forwards unknown fields as is.
Tokens: `mock.tokens`, else `max_tokens`, else 16. Without --tok-per-s the tokens of a
stream come `--chunk-interval-s` apart (0: back to back) and a JSON answer has no delay
beyond its TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
from typing import Any

import orjson

METRICS = (
    b"# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    b"# TYPE vllm:num_requests_running gauge\n"
    b'vllm:num_requests_running{model_name="mock"} 0.0\n'
    b"# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
    b"# TYPE vllm:num_requests_waiting gauge\n"
    b'vllm:num_requests_waiting{model_name="mock"} 0.0\n'
    b"# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
    b"# TYPE vllm:kv_cache_usage_perc gauge\n"
    b'vllm:kv_cache_usage_perc{model_name="mock"} 0.0\n'
)
_REASONS = {200: b"OK", 404: b"Not Found", 400: b"Bad Request"}


class Upstream:
    def __init__(self, args: argparse.Namespace) -> None:
        self.ttft_s: float = args.ttft_s
        self.jitter_s: float = args.ttft_jitter_s
        self.tok_per_s: float = args.tok_per_s
        self.interval_s: float = args.chunk_interval_s
        self.stats = {"requests": 0, "streams": 0, "active": 0, "prompt_tokens": 0,
                      "completion_tokens": 0}
        self.rng = random.Random(args.seed)

    async def connection(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path, _ = lines[0].split(b" ", 2)
                length = 0
                close = False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    lname = name.strip().lower()
                    if lname == b"content-length":
                        length = int(value)
                    elif lname == b"connection" and value.strip().lower() == b"close":
                        close = True
                body = await reader.readexactly(length) if length else b""
                if method == b"POST" and path.endswith(b"/chat/completions"):
                    await self.chat(body, writer)
                elif path == b"/health":
                    _respond(writer, 200, b"{}")
                elif path == b"/metrics":
                    _respond(writer, 200, METRICS, b"text/plain; version=0.0.4")
                elif path == b"/stats":
                    _respond(writer, 200, orjson.dumps(self.stats))
                else:
                    _respond(writer, 404, b'{"error": {"message": "not found"}}')
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def _ttft(self, mock: dict[str, Any]) -> float:
        if "ttft_s" in mock:
            return float(mock["ttft_s"])
        return self.ttft_s + (self.rng.random() * self.jitter_s if self.jitter_s else 0.0)

    async def chat(self, raw: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            _respond(writer, 400, b'{"error": {"message": "bad json"}}')
            return
        mock = body.get("mock") or {}
        tokens = int(mock.get("tokens") or body.get("max_tokens") or 16)
        model = str(body.get("model", "mock")).encode()
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages") or []) // 4 + 1
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += prompt
        self.stats["completion_tokens"] += tokens
        self.stats["active"] += 1
        try:
            if body.get("stream"):
                self.stats["streams"] += 1
                opts = body.get("stream_options")
                usage = isinstance(opts, dict) and opts.get("include_usage") is True
                await self.stream(writer, model, tokens, prompt, usage, mock)
            else:
                delay = self._ttft(mock)
                if self.tok_per_s > 0:
                    delay += tokens / self.tok_per_s
                if delay > 0:
                    await asyncio.sleep(delay)
                _respond(writer, 200, _completion(model, tokens, prompt))
        finally:
            self.stats["active"] -= 1

    async def stream(self, writer: asyncio.StreamWriter, model: bytes, tokens: int,
                     prompt: int, usage: bool, mock: dict[str, Any]) -> None:
        interval = float(mock.get("interval_s", self.interval_s))
        if "interval_s" not in mock and self.tok_per_s > 0:
            interval = 1.0 / self.tok_per_s
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        ttft = self._ttft(mock)
        loop = asyncio.get_running_loop()
        start = loop.time() + ttft
        if ttft > 0:
            await asyncio.sleep(ttft)
        head = (b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,'
                b'"model":"' + model + b'","choices":[{"index":0,"delta":')
        _chunk(writer, head + b'{"role":"assistant","content":"tok "},"finish_reason":null}]}'
               b"\n\n")
        await writer.drain()
        for i in range(1, tokens):
            # On a fixed schedule from the first token, so a slow reader does not stretch it.
            wait = start + i * interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            _chunk(writer, head + b'{"content":"tok "},"finish_reason":null}]}\n\n')
            await writer.drain()
        _chunk(writer, head + b'{},"finish_reason":"length"}]}\n\n')
        if usage:
            _chunk(writer, b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk",'
                   b'"created":0,"model":"' + model + b'","choices":[],"usage":'
                   + orjson.dumps(_usage(prompt, tokens)) + b"}\n\n")
        _chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _completion(model: bytes, tokens: int, prompt: int) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 0,
        "model": model.decode(),
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant", "content": "tok " * min(tokens, 64)}}],
        "usage": _usage(prompt, tokens),
    })


def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


def _respond(writer: asyncio.StreamWriter, status: int, body: bytes,
             ctype: bytes = b"application/json") -> None:
    writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                 % (status, _REASONS.get(status, b"X"), ctype, len(body), body))


async def serve(args: argparse.Namespace) -> None:
    up = Upstream(args)
    server = await asyncio.start_server(up.connection, args.host, args.port, backlog=4096,
                                        limit=1 << 20)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-s", type=float, default=0.0)
    parser.add_argument("--ttft-jitter-s", type=float, default=0.0,
                        help="uniform extra TTFT in [0, this)")
    parser.add_argument("--tok-per-s", type=float, default=0.0,
                        help="output speed; 0: no delay between tokens beyond the interval")
    parser.add_argument("--chunk-interval-s", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

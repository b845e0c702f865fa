"""A stand-in for the vLLM OpenAI server, for the process-supervision tests.

    python fake_engine_server.py PORT [--child-pid-file F] [--exit-after S --exit-code N]
                                      [--ready-after S] [--ignore-sigterm]

Answers GET /health with 200 (after --ready-after seconds) and GET /v1/models. With
--child-pid-file it first spawns a sleeping child in its own process group, the way vLLM
spawns EngineCore, and writes the child's pid there, so a test can check that stopping
the engine leaves no orphan.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_handler(ready_at: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                status = 200 if time.monotonic() >= ready_at else 503
                self._reply(status, b"")
            elif self.path == "/v1/models":
                body = {"object": "list", "data": [{"id": "fake", "object": "model"}]}
                self._reply(200, json.dumps(body).encode())
            else:
                self._reply(404, b'{"detail":"Not Found"}')

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"fake-engine: {format % args}\n")

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--child-pid-file", type=Path)
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--ignore-sigterm", action="store_true")
    args = parser.parse_args()

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.child_pid_file is not None:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(3600)"],
            # The child must inherit the SIGTERM disposition of a real worker: default.
            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
        )
        args.child_pid_file.write_text(str(child.pid))
    print(f"fake engine starting on port {args.port}", flush=True)
    if args.exit_after is not None:
        time.sleep(args.exit_after)
        print(f"fake engine failing on purpose with code {args.exit_code}", flush=True)
        return int(args.exit_code)

    server = ThreadingHTTPServer(
        ("127.0.0.1", args.port), make_handler(time.monotonic() + args.ready_after)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("fake engine ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run any ASGI app with uvicorn on 127.0.0.1 in a background thread, for tests."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

import uvicorn
from starlette.types import ASGIApp


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for child processes; ServerThread needs none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """`with ServerThread(app) as server: httpx.get(server.url + "/v1/models")`.

    The listening socket is bound here and handed to uvicorn, so the port is known before
    the thread starts and no other process can take it in between.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout_s: float = 10.0,
        shutdown_timeout_s: float = 5.0,
        send_buffer: int | None = None,
        **config: Any,
    ) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer is not None:
            # Accepted connections inherit it: a fixed, small send buffer means a slow
            # reader holds the server's response open, as over a real network.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self._sock.bind((host, port))
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        self._startup_timeout_s = startup_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        settings: dict[str, Any] = {
            "log_level": "warning",
            "lifespan": "on",
            # No websockets: importing them can raise DeprecationWarnings, which
            # filterwarnings=error turns into a crash inside the server thread.
            "ws": "none",
            # A stalled handler must not hold shutdown hostage for its whole stall.
            "timeout_graceful_shutdown": 1,
        }
        settings.update(config)
        self._server = uvicorn.Server(uvicorn.Config(app, **settings))
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"uvicorn-{self.port}",
            daemon=True,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                self._sock.close()
                raise RuntimeError(f"server on {self.url} exited during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"server on {self.url} not started in {self._startup_timeout_s} s"
                )
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self._shutdown_timeout_s)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError(f"server on {self.url} did not stop in {self._shutdown_timeout_s} s")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

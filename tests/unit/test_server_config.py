"""The uvicorn config `spillover serve` builds (router/http/server.py), without serving it:
the connection limits served for real are tested in tests/integration/test_server_limits.py."""

from __future__ import annotations

from router.config import Server
from router.http.server import BoundedHttpToolsProtocol, HeadLimits, server_config


def test_the_server_takes_its_limits_from_the_config() -> None:
    defaults = Server()
    assert (defaults.max_header_bytes, defaults.header_timeout_s, defaults.keep_alive_s) \
        == (65536, 10.0, 5)
    cfg = server_config(object(), Server(max_header_bytes=2048, header_timeout_s=3,
                                         keep_alive_s=7), host="127.0.0.1", port=0)
    assert isinstance(cfg.http, type) and issubclass(cfg.http, BoundedHttpToolsProtocol)
    assert cfg.http.limits == HeadLimits(max_bytes=2048, timeout_s=3.0)
    assert cfg.timeout_keep_alive == 7
    # What `spillover serve` has always set stays set.
    assert (cfg.access_log, cfg.proxy_headers, cfg.server_header, cfg.lifespan) \
        == (False, False, False, "on")

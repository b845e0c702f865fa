"""The HTTP/1.1 engine client (router/upstreams/h1.py) hands https URLs to its TLS client;
without one it refuses them as a connect error. No socket: the plain-HTTP side, against
real loopback servers, is tested in tests/integration/test_h1.py."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from router.config import Timeouts
from router.upstreams.h1 import H1Upstream
from router.upstreams.transport import TransportError, UpstreamResponse

# Both loops, like the rest of the client's tests: uvloop is what `spillover serve` runs.
pytestmark = pytest.mark.both_loops

FAST = Timeouts(connect=1.0, read=2.0, write=1.0, pool=0.3)


class _Recording:
    def __init__(self) -> None:
        self.urls: list[str] = []
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def aclose(self) -> None:
        self.closed = True

    async def post(self, url: str, content: bytes, headers: Mapping[str, str],
                   timeouts: Timeouts, remaining_s: float) -> UpstreamResponse:
        self.urls.append(url)
        raise TransportError("Recorded", connect=True)


async def test_tls_goes_to_the_general_client() -> None:
    tls = _Recording()
    up = H1Upstream(max_connections=4, tls=tls)
    await up.start()
    with pytest.raises(TransportError, match="Recorded"):
        await up.post("https://api.mistral.ai/v1/chat/completions", b"{}", {}, FAST, 5.0)
    await up.aclose()
    assert tls.urls == ["https://api.mistral.ai/v1/chat/completions"]
    assert tls.started and tls.closed
    bare = H1Upstream(max_connections=4)
    with pytest.raises(TransportError) as info:
        await bare.post("https://api.mistral.ai/v1/chat/completions", b"{}", {}, FAST, 5.0)
    assert info.value.connect

"""Which of their own API surfaces the local engines serve, learnt from what they answer.

vLLM serves Anthropic's Messages API (`POST /v1/messages`) and OpenAI's Responses API
(`POST /v1/responses`) besides chat completions; an older build, another engine, or one
started without them does not. Nothing here reads a version string: each engine (each
replica of a discovered deployment) is asked, and its answers are kept.

- The probe (with the health probes, when an engine comes up and every `recheck_s` after):
  `GET /v1/messages` and `GET /v1/responses`. A server with the POST route answers 405
  (method not allowed); one without it 404. Neither generates nor validates anything.
  Any other answer (a 200 from a stand-in that answers everything, a 5xx, a timeout)
  says nothing: what was known stays, and an engine never heard from counts as without.
- A real call: a native request answered 404/405/501 with no error of the API's own
  (the route is not there) marks the engine without it at once; the request is sent
  translated (router.routing.dispatch), and the next probe looks again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

log = logging.getLogger("spillover.signals")

APIS: dict[str, str] = {"messages": "/messages", "responses": "/responses"}
RECHECK_S = 300.0


@dataclass(frozen=True, slots=True)
class Known:
    has: bool
    how: str  # what the engine answered that says so
    at: float  # monotonic


class EngineApis:
    """Per engine key (a deployment's name, or "name@address:port" for a replica): which
    APIs of APIS it serves, as last learnt."""

    def __init__(self, *, recheck_s: float = RECHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._recheck = recheck_s
        self._clock = clock
        self._known: dict[str, dict[str, Known]] = {}
        self._probed: dict[str, float] = {}

    def has(self, key: str, api: str) -> bool:
        """Whether `key`'s engine serves `api` natively; unknown counts as no."""
        k = self._known.get(key, {}).get(api)
        return k is not None and k.has

    def learn(self, key: str, api: str, has: bool, how: str) -> None:
        before = self._known.get(key, {}).get(api)
        if before is None or before.has != has:
            log.info("engine %s: %s API %s (%s)", key, api, "served" if has else "not served",
                     how)
        self._known.setdefault(key, {})[api] = Known(has, how, self._clock())

    def recheck(self, key: str) -> None:
        """Probe `key` again at its next health probe (it just came up: maybe another
        build, or started with other flags)."""
        self._probed.pop(key, None)

    def due(self, key: str) -> bool:
        at = self._probed.get(key)
        return at is None or self._clock() - at >= self._recheck

    async def probe(self, client: httpx.AsyncClient, key: str, base_url: str,
                    bound: httpx.Timeout) -> None:
        """Ask the engine at `base_url` (its /v1 root) which APIs it serves."""
        self._probed[key] = self._clock()
        for api, path in APIS.items():
            try:
                resp = await client.get(base_url + path, timeout=bound)
            except Exception as exc:  # a stand-in or a broken engine: nothing learnt
                log.debug("engine %s: API probe of %s failed: %s", key, path,
                          type(exc).__name__)
                continue
            verdict = probe_verdict(resp.status_code)
            if verdict is not None:
                self.learn(key, api, verdict, f"GET /v1{path} answered {resp.status_code}")

    def forget(self, keys: Iterable[str]) -> None:
        """Drop what is known of engines that are gone (a replica removed from DNS)."""
        for key in keys:
            self._known.pop(key, None)
            self._probed.pop(key, None)

    def status(self, key: str) -> dict[str, object]:
        """For /status and explain: per API, served natively or not, how that is known,
        and how long ago."""
        now = self._clock()
        known = self._known.get(key, {})
        out: dict[str, object] = {}
        for api in APIS:
            k = known.get(api)
            out[api] = ({"native": False, "how": "not learnt yet", "age_s": None}
                        if k is None else
                        {"native": k.has, "how": k.how, "age_s": round(now - k.at, 1)})
        return out


def probe_verdict(status: int) -> bool | None:
    """What a GET on a POST-only route's path says: 405 there, 404 not there; anything
    else nothing."""
    if status == 405:
        return True
    if status == 404:
        return False
    return None


def missing_route(status: int, body: bytes) -> bool:
    """Whether a POST's answer says the route is not there (404/405/501 that is not an
    error in the API's own shape, e.g. Starlette's `{"detail": "Not Found"}`), rather than
    the engine refusing this request (vLLM's 404 for an unknown model is an `error`)."""
    if status not in (404, 405, 501):
        return False
    return status == 501 or b'"error"' not in body

"""Engine replicas of one local deployment found by DNS, and which of them serves a request.

A deployment that names `discover` (a Kubernetes headless Service) has one replica per
address the name resolves to; the load monitor resolves it periodically and keeps each
replica's load, health and probes apart (router.routing.load). A request goes to the
replica that rendezvous hashing of its conversation key ranks first, as long as that one is
healthy, not saturated and within a bounded share of the in-flight load (so one hot
conversation cannot pile onto a replica), else to the next in that key's order; a request
without a key goes to the least-loaded replica. Ranking by key keeps a conversation where
its prefix is already in the engine's KV cache, and a replica set that changes moves only
the conversations of the replicas that came or went.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import socket
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from router.routing.policy import EngineLoad

# (host, port) -> the addresses it resolves to now; [] when it resolves to nothing (every
# replica gone). Raising OSError means the lookup failed: the last answer is kept.
Resolver = Callable[[str, int], Awaitable[list[str]]]

# A replica may hold this factor above an even share of the in-flight requests (plus one)
# before a conversation homed on it moves to its next choice (bounded-load hashing)...
LOAD_BOUND = 1.25
# ...but never fewer than this many: an engine batches the requests it runs, so a second or
# third one in flight costs its conversation little, while moving the conversation costs
# a prefill of its whole context on a replica that has none of it cached. (Without the
# floor, at low load a request moved whenever its home replica already ran one request:
# with 4 replicas and 1 in flight, an even share rounds up to 1.)
LOAD_FLOOR = 4

_GONE = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}


async def dns_resolver(host: str, port: int) -> list[str]:
    """Every address of host (IPv4 and IPv6), as the system resolver answers now."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _GONE:
            return []  # a headless Service with no ready pod: NXDOMAIN
        raise
    return sorted({str(info[4][0]) for info in infos})


def replica_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/v1"


def _weight(key: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True, slots=True)
class Choice:
    replica: str
    why: str  # affinity | affinity-moved (<home>: <reason>) | least-loaded | only-choice


def choose(replicas: Sequence[tuple[str, EngineLoad]], key: str | None,
           bound: float = LOAD_BOUND, floor: int = LOAD_FLOOR,
           blocked: Mapping[str, str] | None = None, *,
           tried: Collection[str] = (), turn: int = 0) -> Choice | None:
    """The replica for a request with conversation `key` (None: no affinity). `blocked`:
    the replicas whose circuit breaker forbids a request now, and why.

    `tried`: the replicas this request already failed on before its first byte. A retry
    goes to a sibling that is healthy, closed and not saturated, or nowhere (None: the
    plan's next target is better than a replica known to be in trouble). `turn`: which of
    several equally loaded replicas a request without a key gets (the caller counts it
    up), so that at low load they share the traffic instead of the first by name taking
    it all."""
    blocked = blocked or {}

    def usable(name: str, load: EngineLoad) -> bool:
        return load.healthy and not load.saturated and name not in blocked

    if tried:
        replicas = [r for r in replicas if r[0] not in tried and usable(*r)]
    if not replicas:
        return None
    if key is None:
        pool = [r for r in replicas if usable(*r)] or [
            r for r in replicas if r[1].healthy and r[0] not in blocked] or [
            r for r in replicas if r[1].healthy] or list(replicas)
        least = min((r[1].score, r[1].inflight) for r in pool)
        ties = sorted(r[0] for r in pool if (r[1].score, r[1].inflight) == least)
        return Choice(ties[turn % len(ties)], "least-loaded")
    ranked = sorted(replicas, key=lambda r: _weight(key, r[0]), reverse=True)
    total = sum(load.inflight for _, load in replicas)
    cap = max(floor, math.ceil(bound * (total + 1) / len(replicas)))
    home = ranked[0]
    for name, load in ranked:
        if usable(name, load) and load.inflight < cap:
            if name == home[0]:
                return Choice(name, "affinity")
            why = blocked.get(home[0]) or _why_not(home[1], cap)
            return Choice(name, f"affinity-moved ({home[0]}: {why})")
    # Every replica full, down or open: the home one if it answers at all (the policy
    # decided to serve locally; the engine queues it), else any that does, a replica
    # whose breaker allows a request first.
    alive = [r for r in ranked if r[1].healthy and r[0] not in blocked] or [
        r for r in ranked if r[1].healthy]
    if alive:
        return Choice(alive[0][0], "affinity" if alive[0] is home else "only-choice")
    return Choice(home[0], "only-choice")


def _why_not(load: EngineLoad, cap: int) -> str:
    if not load.healthy:
        return "down"
    if load.saturated:
        return "saturated"
    return f"over its share ({load.inflight} in flight, bound {cap})"


def conversation_key(caller: str, body: dict[str, Any]) -> str | None:
    """What one conversation's requests share: the caller and its opening (the messages up
    to the first user turn; a prompt's first characters), which later turns repeat as the
    prefix the engine has cached. None (no affinity) when the body has neither."""
    messages = body.get("messages")
    opening: object
    if isinstance(messages, list) and messages:
        end = next((i for i, m in enumerate(messages)
                    if isinstance(m, dict) and m.get("role") == "user"), 0)
        opening = messages[:end + 1]
    elif isinstance(body.get("prompt"), str):
        opening = body["prompt"][:_PROMPT_PREFIX]
    else:
        return None
    digest = hashlib.blake2b(orjson.dumps(opening, option=orjson.OPT_SORT_KEYS),
                             digest_size=16, person=b"spillover-conv").hexdigest()
    return f"{caller}:{digest}"


def session_key(caller: str, session: str) -> str:
    """The conversation key of a caller's explicit session id (x-spillover-session): a
    digest of both, so the id is never kept as sent and two callers' equal ids are two
    conversations. It takes precedence over the key read from the body."""
    digest = hashlib.blake2b(f"{caller}\0{session}".encode(), digest_size=16,
                             person=b"spillover-sess").hexdigest()
    return f"{caller}:s:{digest}"


# Characters of a completions prompt that make its conversation key: a system prompt or
# document the follow-up prompts start with.
_PROMPT_PREFIX = 1024

"""Who is calling: API keys (stored only as sha256 digests) -> a caller and its policy.

With no callers configured the gateway runs open for local development: every request
is the anonymous caller with the default policy, and the app says so loudly at start.

The admin key administers (status, reload, everyone's usage, readiness details, metrics);
it is not a caller key: routed endpoints refuse it unless the same digest is also listed
under a caller in models.yaml. The names of the two built-in principals are reserved
(config.RESERVED_CALLER_NAMES), so no configured caller can share their rows or limits.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.config import RESERVED_CALLER_NAMES, Caller
from router.errors import Forbidden, Unauthorized

ANONYMOUS = "anonymous"
ADMIN = "admin"
assert {ANONYMOUS, ADMIN} <= set(RESERVED_CALLER_NAMES)
KEY_PREFIX = "sk-spill-"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    policy: Caller
    admin: bool = False


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh API key and the digest that models.yaml stores instead of it."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key_digest(key)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    def __init__(self, callers: Mapping[str, Caller], admin_digests: Sequence[str],
                 metrics_digests: Sequence[str] = ()) -> None:
        self.open = not callers
        self._by_digest = {d: (name, c) for name, c in callers.items() for d in c.key_sha256}
        self._admin = frozenset(admin_digests)
        self._metrics = frozenset(metrics_digests)
        self._anonymous = Principal(ANONYMOUS, Caller(), admin=not self._admin)
        self._admin_principal = Principal(ADMIN, Caller(), admin=True)

    def caller(self, headers: Mapping[str, str]) -> Principal:
        if self.open:
            return self._anonymous
        token = bearer_token(headers)
        if token is None:
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>'",
                               code="missing_api_key")
        digest = key_digest(token)
        hit = self._by_digest.get(digest)
        if hit is not None:
            return Principal(hit[0], hit[1])
        if digest in self._admin:
            # The admin key would otherwise call every alias, force routes and skip every
            # limit: an operator who wants that lists the digest under a caller too.
            raise Forbidden("the admin key administers the gateway and is not a caller key; "
                            "call models with a caller's key", code="admin_key_not_a_caller")
        # Never echo the key back, not even a prefix: logs and responses stay clean.
        raise Unauthorized("invalid API key")

    def admin(self, headers: Mapping[str, str]) -> Principal:
        """For the admin endpoints: an admin key, or anyone when no admin key is set and
        the gateway runs open (local development)."""
        if not self._admin:
            if self.open:
                return self._anonymous
            raise Forbidden("no admin key is configured (admin_key_sha256 in models.yaml)",
                            code="admin_disabled")
        token = bearer_token(headers)
        if token is not None and key_digest(token) in self._admin:
            return self._admin_principal
        p = self._known(headers)  # 401 for a missing or unknown key
        if not p.admin:
            raise Forbidden("this endpoint needs the admin key", code="admin_only")
        return p

    def viewer(self, headers: Mapping[str, str]) -> Principal:
        """For read endpoints a caller may use on its own data (usage)."""
        return self._known(headers)

    def is_admin(self, headers: Mapping[str, str]) -> bool:
        """Whether these headers may see what only the admin sees (readiness details):
        no error, because such endpoints answer less instead of refusing."""
        try:
            return self.admin(headers).admin
        except (Unauthorized, Forbidden):
            return False

    def metrics(self, headers: Mapping[str, str], public: bool) -> None:
        """GET /metrics: open when the operator made it public, else the admin key or a
        metrics token (what a Prometheus scrape config sends as its bearer)."""
        if public:
            return
        token = bearer_token(headers)
        if token is not None and key_digest(token) in self._metrics:
            return
        self.admin(headers)

    def _known(self, headers: Mapping[str, str]) -> Principal:
        """The admin for the admin key (also when it is a caller's too), else the caller."""
        token = bearer_token(headers)
        if token is not None and key_digest(token) in self._admin:
            return self._admin_principal
        return self.caller(headers)

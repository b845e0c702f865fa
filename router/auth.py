"""Who is calling: API keys (stored only as sha256 digests) -> a caller and its policy.

With no callers configured the gateway runs open for local development: every request
is the anonymous caller with the default policy, and the app says so loudly at start.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.config import Caller
from router.errors import Forbidden, Unauthorized

ANONYMOUS = "anonymous"
ADMIN = "admin"
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
    def __init__(self, callers: Mapping[str, Caller], admin_digests: Sequence[str]) -> None:
        self.open = not callers
        self._by_digest = {d: (name, c) for name, c in callers.items() for d in c.key_sha256}
        self._admin = frozenset(admin_digests)
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
            return self._admin_principal
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
        p = self.caller(headers)  # 401 for a missing or unknown key
        if not p.admin:
            raise Forbidden("this endpoint needs the admin key", code="admin_only")
        return p

    def viewer(self, headers: Mapping[str, str]) -> Principal:
        """For read endpoints a caller may use on its own data (usage)."""
        token = bearer_token(headers)
        if token is not None and key_digest(token) in self._admin:
            return self._admin_principal
        return self.caller(headers)

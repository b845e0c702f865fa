from __future__ import annotations

import re

import pytest
from starlette.datastructures import Headers

from router.config import Caller, RateLimit
from router.errors import Forbidden, SpilloverError, Unauthorized
from router.routing.auth import (
    ADMIN,
    ANONYMOUS,
    KEY_PREFIX,
    Authenticator,
    Principal,
    bearer_token,
    key_digest,
    new_key,
)
from tests.unit.helpers import bearer

APP_KEY = "sk-spill-app-key-one"
APP_KEY_2 = "sk-spill-app-key-two"
BATCH_KEY = "sk-spill-batch-key"
ADMIN_KEY = "sk-spill-the-admin-key"
UNKNOWN_KEY = "sk-spill-nobody-knows-me"

APP = Caller(key_sha256=[key_digest(APP_KEY), key_digest(APP_KEY_2)], use="research",
             rate_limit=RateLimit(requests_per_minute=10))
BATCH = Caller(key_sha256=[key_digest(BATCH_KEY)], residency="onprem")
CALLERS = {"app": APP, "batch": BATCH}


def assert_key_not_leaked(err: SpilloverError, key: str) -> None:
    secret = key.removeprefix(KEY_PREFIX)
    for text in (str(err), err.message, repr(err.body()), repr(err.headers)):
        assert key not in text
        assert secret[:6] not in text  # not even a prefix of the secret part


# -- key_digest / new_key ------------------------------------------------------------


def test_key_digest_is_sha256_hex() -> None:
    assert key_digest("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert key_digest("é") == key_digest("\u00e9")  # utf-8, not latin-1
    assert key_digest("a") != key_digest("A")


def test_new_key_is_prefixed_random_and_digest_matches() -> None:
    keys = {new_key() for _ in range(20)}
    assert len({k for k, _ in keys}) == 20
    for key, digest in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) >= len(KEY_PREFIX) + 40  # 32 random bytes, url-safe base64
        assert re.fullmatch(r"[A-Za-z0-9_-]+", key.removeprefix(KEY_PREFIX))
        assert digest == key_digest(key)
        assert re.fullmatch(r"[0-9a-f]{64}", digest)


# -- bearer_token --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Bearer abc"}, "abc"),
        ({"authorization": "bearer abc"}, "abc"),
        ({"authorization": "BEARER abc"}, "abc"),
        ({"authorization": "BeArEr abc"}, "abc"),
        ({"authorization": "Bearer    abc"}, "abc"),
        ({"authorization": "  Bearer abc  "}, "abc"),
        ({"authorization": "Bearer sk-spill-x_y-z"}, "sk-spill-x_y-z"),
        ({}, None),
        ({"x-api-key": "abc"}, None),
        ({"authorization": ""}, None),
        ({"authorization": "   "}, None),
        ({"authorization": "Bearer"}, None),
        ({"authorization": "Bearer "}, None),
        ({"authorization": "Bearer      "}, None),
        ({"authorization": "abc"}, None),
        ({"authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"}, None),
        ({"authorization": "Token abc"}, None),
        ({"authorization": "Bearerabc"}, None),
    ],
)
def test_bearer_token(headers: dict[str, str], expected: str | None) -> None:
    assert bearer_token(headers) == expected


def test_bearer_token_reads_case_insensitive_request_headers() -> None:
    # Starlette's Headers is what the gateway passes in: header names ignore case.
    headers = Headers(raw=[(b"authorization", b"Bearer abc")])
    assert bearer_token(headers) == "abc"
    assert bearer_token(Headers(headers={"Authorization": "Bearer xyz"})) == "xyz"


# -- open mode (no callers) ----------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, bearer(UNKNOWN_KEY), {"authorization": "Basic x"}])
def test_open_mode_everyone_is_anonymous_admin(headers: dict[str, str]) -> None:
    auth = Authenticator({}, [])
    assert auth.open
    for who in (auth.caller(headers), auth.admin(headers), auth.viewer(headers)):
        assert who == Principal(ANONYMOUS, Caller(), admin=True)


def test_open_mode_with_admin_key_anonymous_is_not_admin() -> None:
    auth = Authenticator({}, [key_digest(ADMIN_KEY)])
    assert auth.open
    p = auth.caller({})
    assert p.name == ANONYMOUS
    assert p.policy == Caller()
    assert not p.admin
    with pytest.raises(Forbidden) as exc:
        auth.admin({})
    assert exc.value.status == 403
    assert exc.value.code == "admin_only"
    # viewer() recognises the admin key even when the gateway runs open.
    assert auth.viewer(bearer(ADMIN_KEY)) == Principal(ADMIN, Caller(), admin=True)
    assert auth.viewer({}).name == ANONYMOUS


def test_open_mode_admin_key_reaches_admin_endpoints() -> None:
    auth = Authenticator({}, [key_digest(ADMIN_KEY)])
    assert auth.admin(bearer(ADMIN_KEY)).admin


# -- callers configured --------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "name", "policy"),
    [(APP_KEY, "app", APP), (APP_KEY_2, "app", APP), (BATCH_KEY, "batch", BATCH)],
)
def test_caller_key_gives_its_principal_and_policy(key: str, name: str, policy: Caller) -> None:
    auth = Authenticator(CALLERS, [key_digest(ADMIN_KEY)])
    assert not auth.open
    for who in (auth.caller(bearer(key)), auth.viewer(bearer(key))):
        assert who.name == name
        assert who.policy is policy
        assert not who.admin


def test_admin_key_gives_admin_principal() -> None:
    auth = Authenticator(CALLERS, [key_digest("other-admin"), key_digest(ADMIN_KEY)])
    expected = Principal(ADMIN, Caller(), admin=True)
    assert auth.admin(bearer(ADMIN_KEY)) == expected
    assert auth.viewer(bearer(ADMIN_KEY)) == expected
    assert auth.admin({"authorization": "bearer   other-admin "}) == expected


@pytest.mark.parametrize(
    ("headers", "code", "key"),
    [
        ({}, "missing_api_key", None),
        ({"authorization": "Bearer "}, "missing_api_key", None),
        ({"authorization": f"Basic {APP_KEY}"}, "missing_api_key", APP_KEY),
        ({"authorization": APP_KEY}, "missing_api_key", APP_KEY),
        (bearer(UNKNOWN_KEY), "invalid_api_key", UNKNOWN_KEY),
        (bearer(APP_KEY.upper()), "invalid_api_key", APP_KEY.upper()),
        (bearer(APP_KEY + "x"), "invalid_api_key", APP_KEY + "x"),
        # A digest is not a key: sending what models.yaml stores must not work.
        (bearer(key_digest(APP_KEY)), "invalid_api_key", key_digest(APP_KEY)),
    ],
)
@pytest.mark.parametrize("method", ["caller", "viewer", "admin"])
def test_unknown_or_missing_key_is_unauthorized(
    method: str, headers: dict[str, str], code: str, key: str | None
) -> None:
    auth = Authenticator(CALLERS, [key_digest(ADMIN_KEY)])
    with pytest.raises(Unauthorized) as exc:
        getattr(auth, method)(headers)
    err = exc.value
    assert err.status == 401
    assert err.code == code
    assert err.body()["error"]["code"] == code
    if key is not None:
        assert_key_not_leaked(err, key)


def test_caller_key_on_admin_endpoint_is_forbidden() -> None:
    auth = Authenticator(CALLERS, [key_digest(ADMIN_KEY)])
    with pytest.raises(Forbidden) as exc:
        auth.admin(bearer(APP_KEY))
    assert exc.value.status == 403
    assert exc.value.code == "admin_only"
    assert_key_not_leaked(exc.value, APP_KEY)


@pytest.mark.parametrize("headers", [{}, bearer(APP_KEY), bearer(ADMIN_KEY), bearer(UNKNOWN_KEY)])
def test_admin_disabled_when_callers_but_no_admin_key(headers: dict[str, str]) -> None:
    auth = Authenticator(CALLERS, [])
    with pytest.raises(Forbidden) as exc:
        auth.admin(headers)
    assert exc.value.status == 403
    assert exc.value.code == "admin_disabled"
    # The ordinary endpoints still work for callers.
    assert auth.caller(bearer(APP_KEY)).name == "app"
    assert auth.viewer(bearer(BATCH_KEY)).name == "batch"


def test_caller_without_keys_cannot_be_reached() -> None:
    auth = Authenticator({"keyless": Caller()}, [])
    assert not auth.open
    with pytest.raises(Unauthorized):
        auth.caller(bearer(""))
    with pytest.raises(Unauthorized):
        auth.caller(bearer(UNKNOWN_KEY))


# -- the admin key is not a caller key -------------------------------------------------


def test_admin_key_is_not_a_caller_key() -> None:
    """Else it would call every alias, force routes and skip every limit."""
    auth = Authenticator(CALLERS, [key_digest(ADMIN_KEY)])
    with pytest.raises(Forbidden) as exc:
        auth.caller(bearer(ADMIN_KEY))
    assert exc.value.status == 403
    assert exc.value.code == "admin_key_not_a_caller"
    assert_key_not_leaked(exc.value, ADMIN_KEY)
    # It still administers and sees everyone's usage.
    assert auth.admin(bearer(ADMIN_KEY)).admin
    assert auth.viewer(bearer(ADMIN_KEY)).admin


def test_admin_key_listed_under_a_caller_is_both() -> None:
    ops = Caller(key_sha256=[key_digest(ADMIN_KEY)], aliases=["demo"])
    auth = Authenticator({**CALLERS, "ops": ops}, [key_digest(ADMIN_KEY)])
    who = auth.caller(bearer(ADMIN_KEY))
    assert who.name == "ops" and who.policy is ops and not who.admin
    assert auth.admin(bearer(ADMIN_KEY)).admin


METRICS_TOKEN = "prom-scrape-token"


@pytest.mark.parametrize(
    ("headers", "public", "allowed"),
    [
        ({}, True, True),
        (bearer(APP_KEY), True, True),
        ({}, False, False),
        (bearer(APP_KEY), False, False),
        (bearer(UNKNOWN_KEY), False, False),
        (bearer(METRICS_TOKEN), False, True),
        (bearer(ADMIN_KEY), False, True),
    ],
)
def test_metrics_access(headers: dict[str, str], public: bool, allowed: bool) -> None:
    auth = Authenticator(CALLERS, [key_digest(ADMIN_KEY)], [key_digest(METRICS_TOKEN)])
    if allowed:
        auth.metrics(headers, public)
    else:
        with pytest.raises((Unauthorized, Forbidden)):
            auth.metrics(headers, public)
    # The metrics token opens /metrics only: no admin endpoint, no model.
    with pytest.raises((Unauthorized, Forbidden)):
        auth.admin(bearer(METRICS_TOKEN))
    with pytest.raises(Unauthorized):
        auth.caller(bearer(METRICS_TOKEN))


def test_is_admin_answers_without_raising() -> None:
    auth = Authenticator(CALLERS, [key_digest(ADMIN_KEY)])
    assert auth.is_admin(bearer(ADMIN_KEY))
    assert not auth.is_admin({})
    assert not auth.is_admin(bearer(APP_KEY))
    assert not auth.is_admin(bearer(UNKNOWN_KEY))
    assert Authenticator({}, []).is_admin({})  # open, no admin key: local development
    assert not Authenticator(CALLERS, []).is_admin(bearer(APP_KEY))

"""Tiered aliases end to end: the real demo engine as the everyday tier, the fake La
Plateforme's flagship as the hard one, the openai SDK as the caller."""

from __future__ import annotations

from typing import Any

import pytest

from router.routing.auth import key_digest
from tests.e2e.conftest import Hosted, Router

pytestmark = pytest.mark.e2e

KEYS = {"app": "sk-e2e-tier-app", "vault": "sk-e2e-tier-vault"}
HARD = ("Explain step by step why this fails, then prove the fix and compare the "
        "trade-offs:\n```py\nx = 1\n```\n```py\ny = 2\n```")
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"]}}}


def tiered(make_router: Any) -> Router:
    r: Router = make_router(extra={
        "admin_key_sha256": [key_digest("sk-e2e-tier-admin")],
        "callers": {"app": {"key_sha256": [key_digest(KEYS["app"])]},
                    "vault": {"key_sha256": [key_digest(KEYS["vault"])],
                              "residency": "onprem"}},
        "aliases": {
            "flagship": {"hosted": [{"provider": "mistral", "model": "mistral-large-latest",
                                     "price": {"input_per_mtok": 2, "output_per_mtok": 6}}]},
            "auto": {"tiers": ["demo", "flagship"], "thresholds": [0.45], "sticky_s": 600},
        }})
    return r


def flagship(plateforme: Hosted) -> list[Any]:
    return [q for q in plateforme.fake.requests_to("/v1/chat/completions")
            if q.body["model"] == "mistral-large-latest"]


def test_tiers_end_to_end(make_router: Any, plateforme: Hosted) -> None:
    router = tiered(make_router)
    app = router.client.with_options(api_key=KEYS["app"])
    assert "auto" in {m.id for m in app.models.list().data}

    # Everyday: the demo engine.
    raw = app.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert raw.headers["x-spillover-tier"] == "demo"
    assert raw.headers["x-spillover-route"] == "local"
    assert not flagship(plateforme)

    # Hard: escalated by its score to the (fake) flagship.
    hard = [{"role": "system", "content": "be exact"}, {"role": "user", "content": HARD}]
    raw = app.chat.completions.with_raw_response.create(model="auto", messages=hard,
                                                        max_tokens=2000)
    assert raw.headers["x-spillover-tier"] == "flagship", dict(raw.headers)
    assert raw.headers["x-spillover-escalation"].startswith("score;")
    assert raw.parse().choices[0].message.content
    assert len(flagship(plateforme)) == 1

    # The same conversation goes on with an easy turn: it stays on the flagship.
    follow = [*hard, {"role": "assistant", "content": "done"},
              {"role": "user", "content": "thanks"}]
    raw = app.chat.completions.with_raw_response.create(model="auto", messages=follow,
                                                        max_tokens=8)
    assert raw.headers["x-spillover-tier"] == "flagship"
    assert raw.headers["x-spillover-escalation"].startswith("sticky;")
    assert len(flagship(plateforme)) == 2

    # A JSON-schema request the demo model's random weights cannot satisfy: the cascade
    # re-sends it to the flagship; the caller sees only that answer.
    raw = app.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "a person"}], max_tokens=12,
        response_format=PERSON)  # type: ignore[arg-type]
    assert raw.headers["x-spillover-tier"] == "flagship", dict(raw.headers)
    assert raw.headers["x-spillover-escalation"].startswith("cascade-")
    assert raw.headers["x-spillover-route"] == "hosted"
    assert len(flagship(plateforme)) == 3

    # An on-prem-only caller's hard request: the flagship is hosted only, so it is kept
    # on the local everyday tier, never sent out.
    vault = router.client.with_options(api_key=KEYS["vault"])
    raw = vault.chat.completions.with_raw_response.create(model="auto", messages=hard,
                                                          max_tokens=8)
    assert (raw.headers["x-spillover-tier"], raw.headers["x-spillover-route"]) == \
        ("demo", "local")
    assert raw.headers["x-spillover-escalation"].startswith("lower;")
    assert len(flagship(plateforme)) == 3

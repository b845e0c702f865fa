"""The fake La Plateforme's own state, without serving it (served over HTTP, it is tested in
tests/integration/test_fake_plateforme.py)."""

from __future__ import annotations

from tests.fakes import FakePlateforme


def test_reset_restores_the_constructor_settings() -> None:
    fake = FakePlateforme(stall_s=3, latency_s=0.5)
    fake.mode, fake.stall_s, fake.latency_s = "stall", 9, 0
    fake.fail_next(1, 500)

    fake.reset()

    assert (fake.mode, fake.stall_s, fake.latency_s) == ("ok", 3, 0.5)
    assert fake._take_fault() is None

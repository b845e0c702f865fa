"""`spillover tiers calibrate`: hits its target share on a generated corpus, from a file
of bodies and from the ledger's scores."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from router.accounting.ledger import Ledger, LedgerRow
from router.cli import main
from router.config import parse_config
from router.routing.calibrate import Sample, calibrate, from_bodies, threshold_for
from tests.unit.test_tiers import TIERED

WORDS = ("explain", "why", "then", "prove", "compare", "plan", "hello", "data", "step by step",
         "table", "list", "```x = 1```", "design", "weather", "thanks")


def corpus(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 120)))
        body: dict[str, Any] = {"model": "auto", "messages": [
            {"role": "user", "content": text}] * rnd.randint(1, 6)}
        if rnd.random() < 0.5:
            body["max_tokens"] = rnd.randint(16, 3000)
        if rnd.random() < 0.1:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "x", "schema": {"type": "object"}}}
        out.append(body)
    return out


@pytest.mark.parametrize("target", [0.05, 0.2, 0.5])
def test_calibration_hits_the_target_share_within_one_point(target: float) -> None:
    cfg = parse_config(TIERED)
    lines = [json.dumps(b).encode() for b in corpus(2000)]
    samples, skipped = from_bodies(lines, cfg, "auto")
    assert skipped == 0 and len(samples) == 2000
    c = calibrate(cfg, "auto", samples, target)
    assert abs(c.share - target) <= 0.01, c
    # The threshold it prints, applied by the scorer, escalates that share.
    assert sum(s.score >= c.threshold for s in samples) == c.escalated


def test_threshold_ties_and_edges() -> None:
    assert threshold_for([0.1, 0.2, 0.3, 0.4], 0.5) == pytest.approx(0.25)
    assert threshold_for([0.5] * 10, 0.0) == 1.0
    with pytest.raises(ValueError):
        threshold_for([], 0.2)


def test_cost_estimate_prices_escalated_requests_at_the_top_tier() -> None:
    cfg = parse_config(TIERED)  # medium: 0.4/2 per Mtok, large: 2/6
    samples = [Sample(0.9, 1_000_000, 0), Sample(0.1, 1_000_000, 0)]
    c = calibrate(cfg, "auto", samples, 0.5)
    assert (c.top, c.below, c.escalated) == ("large", "medium", 1)
    assert c.cost_usd == pytest.approx(2.0 + 0.4)
    assert c.cost_everyday_usd == pytest.approx(0.8)


def test_cli_from_a_jsonl_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "models.yaml").write_text(TIERED)
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("\n".join(json.dumps(b) for b in corpus(500)) + "\nnot json\n")
    rc = main(["tiers", "calibrate", "--config", str(tmp_path / "models.yaml"),
               "--target-share", "0.2", "--from", str(bodies)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "500 requests" in out and "1 lines skipped" in out
    assert "to large" in out and "estimated cost:" in out


def test_cli_from_the_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "ledger.db"
    (tmp_path / "models.yaml").write_text(TIERED.replace(
        "providers:", f"server: {{ledger_path: '{db}'}}\nproviders:", 1))
    now = time.time()

    async def write() -> None:
        ledger = Ledger(db)
        await ledger.start()
        for i in range(100):
            await ledger.record(LedgerRow(
                now - i, f"r{i}", "app", "medium", "hosted", "mistral", "m", 100, 10,
                0.0, 0.0, 0.1, None, 200, "local-ok", "chat", tier="medium", score=i / 100,
                escalation="score"))
        # A cascade's second call of the same request is not a second sample.
        await ledger.record(LedgerRow(now, "r0", "app", "large", "hosted", "mistral", "m",
                                      100, 10, 0.0, 0.0, 0.1, None, 200, "local-ok", "chat",
                                      tier="large", score=0.0, escalation="cascade-length"))
        await ledger.stop()
        ledger.close()

    asyncio.run(write())
    rc = main(["tiers", "calibrate", "--config", str(tmp_path / "models.yaml"),
               "--target-share", "0.2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "100 requests" in out and "sends 20 (20.0%" in out
    assert "threshold 0.795" in out

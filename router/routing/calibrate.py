"""`spillover tiers calibrate`: the top threshold of a tiered alias that would have sent a
target share of past requests to its top tier, and what those requests would have cost.

Scores come from the ledger (each tiered call's score, never its text) or from a file of
request bodies scored here with the alias's default scorer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from router.config import Config, Price
from router.routing.catalog import Catalog
from router.routing.tiers import default_score, view_of


@dataclass(frozen=True, slots=True)
class Sample:
    score: float
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Calibration:
    alias: str
    threshold: float
    share: float  # of the samples at or above the threshold
    samples: int
    escalated: int
    cost_usd: float  # every sample at its tier under the new threshold
    cost_everyday_usd: float  # every sample on the tier below the top one
    top: str
    below: str


def threshold_for(scores: Sequence[float], share: float) -> float:
    """A threshold in (0, 1] with `share` of the scores at or above it, as near as their
    ties allow: halfway between the last score in and the first one out."""
    if not scores:
        raise ValueError("no scores to calibrate on")
    ranked = sorted(scores, reverse=True)
    k = round(share * len(ranked))
    if k <= 0:
        return 1.0  # only a perfect score escalates
    if k >= len(ranked):
        return max(ranked[-1], 1e-6)
    t = (ranked[k - 1] + ranked[k]) / 2
    return min(1.0, max(t, 1e-6))


def calibrate(cfg: Config, alias: str, samples: Sequence[Sample],
              share: float) -> Calibration:
    tiers = cfg.aliases[alias].tiers or []
    top, below = tiers[-1], tiers[-2]
    # Rounded as printed: the share reported is the share that threshold gives.
    t = round(threshold_for([s.score for s in samples], share), 4)
    catalog = Catalog(cfg)
    up, down = _price(catalog, top), _price(catalog, below)
    escalated = [s for s in samples if s.score >= t]
    cost = sum(_cost(up if s.score >= t else down, s) for s in samples)
    everyday = sum(_cost(down, s) for s in samples)
    return Calibration(alias, t, len(escalated) / len(samples), len(samples),
                       len(escalated), cost, everyday, top, below)


def _price(catalog: Catalog, alias: str) -> Price | None:
    backends = catalog.backends(alias) or ()
    if any(b.route == "local" for b in backends):
        return None  # served locally first: the GPU's cost, not a price per token
    return catalog.hosted_price(alias)


def _cost(price: Price | None, s: Sample) -> float:
    return 0.0 if price is None else price.cost(s.prompt_tokens, s.completion_tokens)


def from_ledger(rows: Iterable[object], tiers: Sequence[str]) -> list[Sample]:
    """One sample per request of the alias: a cascade's re-sent call is the same request."""
    out = []
    for row in rows:
        tier, score = getattr(row, "tier", ""), getattr(row, "score", None)
        if tier not in tiers or score is None:
            continue
        if str(getattr(row, "escalation", "")).startswith("cascade"):
            continue
        out.append(Sample(float(score), int(getattr(row, "prompt_tokens", 0)),
                          int(getattr(row, "completion_tokens", 0))))
    return out


def from_bodies(lines: Iterable[bytes], cfg: Config, alias: str,
                completion_tokens: int = 256) -> tuple[list[Sample], int]:
    """Samples scored from JSONL request bodies (a line may also be a Batch API line
    with the body under "body"); the count of lines skipped as not a chat body. Output
    tokens are the body's max_tokens, else `completion_tokens`."""
    scorer = cfg.aliases[alias].scorer
    out, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            body = orjson.loads(line)
        except orjson.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(body, dict) and isinstance(body.get("body"), dict):
            body = body["body"]
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            skipped += 1
            continue
        view = view_of("chat", body)
        score, _ = default_score(view, scorer)
        mt = view.max_tokens or completion_tokens
        out.append(Sample(score, view.prompt_tokens, mt))
    return out, skipped


def render(c: Calibration, target: float, source: str) -> str:
    pct = 100 * c.share
    saved = c.cost_usd - c.cost_everyday_usd
    return "\n".join([
        f"{c.alias}: {c.samples} requests from {source}",
        f"threshold {c.threshold} sends {c.escalated} ({pct:.1f}%, target "
        f"{100 * target:.1f}%) to {c.top}, the rest to {c.below}",
        f"estimated cost: {c.cost_usd:.4f} USD ({c.cost_everyday_usd:.4f} USD all on "
        f"{c.below}, escalation adds {saved:.4f} USD)",
        f"models.yaml: aliases.{c.alias}.thresholds[-1]: {c.threshold}",
    ] + ([f"note: {c.escalated} requests share the scores at the threshold; no threshold "
          f"comes nearer to {100 * target:.1f}%"] if abs(c.share - target) > 0.01 else []))

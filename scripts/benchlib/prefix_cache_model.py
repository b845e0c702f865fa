#!/usr/bin/env python3
"""What prefix-cache hit rate least-loaded and affinity routing can reach, by a model of
vLLM's block cache instead of engines: the workload of scripts/bench_affinity.py in
seconds, to see which regimes can show a difference before spending engine time.

    .venv/bin/python scripts/benchlib/prefix_cache_model.py            # the bench's regimes
    .venv/bin/python scripts/benchlib/prefix_cache_model.py --replicas 2 --load 0.7 1.8 2.5

The model: each replica caches full blocks (128 tokens, vLLM's CPU block size) in one LRU
queue; a request hits the longest run of its conversation's blocks from the start that is
still cached (never its last token), then its blocks go back to the queue tail first, as
vLLM frees them, so a conversation's opening outlives its tail. Turns of all the
conversations interleave at random (every conversation equally likely next), least-loaded
is modelled as a uniform pick (with requests that finish at once, in-flight counts are
even), affinity as each conversation's own replica by hashing. No bounded-load moves, no
requests running side by side (their blocks are pinned in the engine), no timing.
"""

from __future__ import annotations

import argparse
import hashlib
import random
from collections import OrderedDict

BLOCK = 128


def hit_rate(conversations: int, turns: int, opening: int, per_turn: int, blocks: int,
             replicas: int, affinity: bool, seed: int) -> float:
    """Hit tokens over prompt tokens for one phase of the workload."""
    rng = random.Random(seed)
    caches: list[OrderedDict[tuple[int, int], None]] = [OrderedDict() for _ in range(replicas)]
    home = [max(range(replicas), key=lambda r, c=c: hashlib.blake2b(
        f"{seed}/{c}/{r}".encode(), digest_size=8).digest()) for c in range(conversations)]
    done = [0] * conversations
    active = list(range(conversations))
    hits = queries = 0
    while active:
        c = rng.choice(active)
        tokens = opening + done[c] * per_turn
        cache = caches[home[c] if affinity else rng.randrange(replicas)]
        full = tokens // BLOCK
        hit = 0
        while hit < full and (c, hit) in cache and (hit + 1) * BLOCK <= tokens - 1:
            hit += 1
        hits += hit * BLOCK
        queries += tokens
        for b in range(full):
            cache.pop((c, b), None)
        for b in reversed(range(full)):  # freed tail first: evicted first
            cache[(c, b)] = None
        while len(cache) > blocks:
            cache.popitem(last=False)
        done[c] += 1
        if done[c] == turns:
            active.remove(c)
    return hits / queries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    p.add_argument("--load", type=float, nargs="+", default=[0.7, 1.3, 1.8, 3.2],
                   help="the conversations at their last turn over one replica's cache")
    p.add_argument("--blocks", type=int, default=128, help="KV cache blocks per replica")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--opening", type=int, default=1100, help="turn 1's prompt tokens")
    p.add_argument("--per-turn", type=int, default=150, help="prompt tokens a turn adds")
    p.add_argument("--seeds", type=int, default=6)
    args = p.parse_args()
    last = args.opening + (args.turns - 1) * args.per_turn
    print("replicas  load  conversations  least-loaded  affinity  ratio")
    for replicas in args.replicas:
        for load in args.load:
            n = max(2, round(load * args.blocks * BLOCK / last))
            rates = [sum(hit_rate(n, args.turns, args.opening, args.per_turn, args.blocks,
                                  replicas, aff, s) for s in range(args.seeds)) / args.seeds
                     for aff in (False, True)]
            print(f"{replicas:8}  {load:4g}  {n:13}  {100 * rates[0]:11.1f}%  "
                  f"{100 * rates[1]:7.1f}%  {rates[1] / rates[0]:5.2f}")


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks in scripts/bench_*.py: child processes, a minimal
OpenAI-compatible upstream, an HTTP/1.1 load client and percentile helpers.

Imported as `benchlib` (the scripts put `scripts/` on sys.path by being run from it).
"""

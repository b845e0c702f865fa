"""spillover's gateway: one OpenAI-compatible endpoint in front of local engines and
hosted APIs.

One request (POST /v1/chat/completions, /v1/completions, /v1/embeddings), in order:

    http/fastlane.py        FastLaneApp takes the path before FastAPI's layers (the app's
                            own middleware still wraps it); other paths go to http/routes.py
    runtime.py              `Runtime.parts`: the gateway of the config now, read once
    routing/gateway.py      Gateway.handle: admission and plan, in this order:
    routing/auth.py           the caller from its API key (its policy)
    http/inbound.py           the body read once; routing facts (model, stream, sizes)
    routing/ratelimit.py      request/token buckets; the caller's open-stream cap
    routing/policy.py         the pure decision: candidates, filters, local vs hosted
    routing/load.py           load signals the policy reads (engines' metrics, in flight)
    routing/dispatch.py     Dispatcher.run: targets in order, retries before the first byte
    routing/resilience.py     breakers and the retry policy
    providers/              the body shaped for the target (vLLM, Mistral, ...)
    upstreams/              the bytes sent: h1.py to the engines, transport.py (TLS) hosted
    accounting/budgets.py   cost from usage and prices, the caller's budget settled
    accounting/recorder.py  the call closed: ledger row, recent calls, metrics
    http/errors.py          any refusal on the way, in OpenAI's error shape

A streamed response (stream: true) continues from dispatch:

    upstreams/sse.py        the upstream's events, read in batches
    routing/dispatch.py     each event translated back (providers/), usage taken from the
                            last one; an error after the first byte becomes an error event
    http/streaming.py       EventStream writes them (Relay ends the call however the
                            stream stops: done, cut off, or the caller gone)
    accounting/             when the stream ends: cost, budget, ledger row, metrics

Built by app.py (create_app) from config.py's models.yaml; runtime.py holds the parts a
reload swaps; cli.py runs it. Which package may import which: tests/unit/
test_architecture.py.
"""

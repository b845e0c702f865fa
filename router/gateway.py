"""One request, start to finish: read it, decide where it goes, hand the plan to dispatch."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from router.catalog import Catalog
from router.config import Config, Endpoint
from router.dispatch import Call, Dispatcher
from router.errors import Forbidden, InvalidRequest, NotFound, SpilloverError, Unavailable
from router.inbound import facts_for, read_json
from router.policy import RoutePlan, decide
from router.signals import LoadMonitor

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id(request: Request) -> str:
    # A caller's id is reused only when it is safe to echo into headers and logs.
    rid = request.headers.get("x-request-id")
    if rid and _REQUEST_ID.match(rid):
        return rid
    return uuid.uuid4().hex


class Gateway:
    def __init__(self, config: Config, catalog: Catalog, monitor: LoadMonitor,
                 dispatcher: Dispatcher) -> None:
        self.config = config
        self.catalog = catalog
        self.monitor = monitor
        self.dispatcher = dispatcher

    async def handle(self, endpoint: Endpoint, request: Request) -> Response:
        started = time.monotonic()
        rid = request_id(request)
        body = await read_json(request, self.config.server.max_body_bytes)
        facts = facts_for(endpoint, body, request.headers)
        backends = self.catalog.backends(facts.alias)
        if backends is None:
            raise NotFound(f"The model '{facts.alias}' does not exist; GET /v1/models lists "
                           "the models this gateway serves", param="model",
                           code="model_not_found")
        plan = decide(facts, backends, self.monitor.view())
        if plan.refusal is not None:
            raise _refused(plan)
        call = Call(request_id=rid, facts=facts, started=started,
                    deadline=started + self.config.server.request_timeout_s,
                    wants_usage=_caller_wants_usage(body))
        return await self.dispatcher.run(call, plan, body)


def _caller_wants_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _refused(plan: RoutePlan) -> SpilloverError:
    r = plan.refusal
    assert r is not None
    headers = {"x-spillover-reason": r.code}
    if r.status == 403:
        return Forbidden(r.message, code=r.code, headers=headers)
    if r.status == 503:
        return Unavailable(r.message, code=r.code, headers={**headers, "retry-after": "5"})
    return InvalidRequest(r.message, code=r.code, headers=headers)

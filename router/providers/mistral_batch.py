"""La Plateforme's Batch API: upload a JSONL file (purpose=batch), create a job for one
model and endpoint, poll it, read its output file.

A job's input lines are `{"custom_id", "body"}` (the model is the job's); its output file
has one line per request, `{"id", "custom_id", "response": {"status_code", "body"},
"error"}`. Statuses: QUEUED, RUNNING, SUCCESS, FAILED, TIMEOUT_EXCEEDED,
CANCELLATION_REQUESTED, CANCELLED.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

RUNNING = frozenset({"QUEUED", "RUNNING", "CANCELLATION_REQUESTED"})
ENDED = frozenset({"SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"})
# One job operation; the upload of a large file gets the write timeout's share.
_TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=120.0, pool=10.0)
_PAGE = 100  # jobs per list page (the SDK's default page_size)


class BatchJobError(RuntimeError):
    """La Plateforme refused or failed a batch operation (no key, no body in it)."""


class MistralBatches:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._headers = {"authorization": f"Bearer {api_key}"}

    async def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = await self._client.request(method, self._base + path, headers=self._headers,
                                       timeout=_TIMEOUT, **kw)
        if r.status_code >= 400:
            # The status only: an error body may echo what was sent.
            raise BatchJobError(f"{method} {path.split('/')[1]}: HTTP {r.status_code}")
        return r

    async def upload(self, name: str, jsonl: bytes) -> str:
        r = await self._call("POST", "/files", data={"purpose": "batch"},
                             files={"file": (name, jsonl, "application/jsonl")})
        return str(r.json()["id"])

    async def create(self, file_id: str, model: str, endpoint: str,
                     metadata: dict[str, str], timeout_hours: int) -> dict[str, Any]:
        r = await self._call("POST", "/batch/jobs", json={
            "input_files": [file_id], "model": model, "endpoint": endpoint,
            "metadata": metadata, "timeout_hours": timeout_hours})
        job: dict[str, Any] = r.json()
        return job

    async def find(self, metadata: dict[str, str], *, pages: int = 5) -> dict[str, Any] | None:
        """The most recent job whose metadata holds every pair of `metadata`, or None.

        GET /v1/batch/jobs, with the query Mistral's SDK (its generated
        JobsAPIRoutesBatchGetBatchJobsRequest) sends: `metadata` is a form-exploded
        object, so each pair is a query parameter of its own. The pairs are checked here
        again: a job is adopted only when it really carries them."""
        for page in range(pages):
            params: list[tuple[str, str | int]] = [("page", page), ("page_size", _PAGE)]
            params += sorted(metadata.items())
            params += [("created_by_me", "false"), ("order_by", "-created")]
            listed = (await self._call("GET", "/batch/jobs", params=params)).json()
            jobs = listed.get("data") or []
            for job in jobs:
                got = job.get("metadata") or {}
                if isinstance(got, dict) and all(got.get(k) == v for k, v in metadata.items()):
                    found: dict[str, Any] = job
                    return found
            if len(jobs) < _PAGE:
                return None
        return None

    async def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = (await self._call("GET", f"/batch/jobs/{job_id}")).json()
        return job

    async def cancel(self, job_id: str) -> None:
        await self._call("POST", f"/batch/jobs/{job_id}/cancel")

    async def results(self, file_id: str) -> list[dict[str, Any]]:
        """The lines of an output or error file."""
        r = await self._call("GET", f"/files/{file_id}/content")
        return [orjson.loads(x) for x in r.content.splitlines() if x.strip()]

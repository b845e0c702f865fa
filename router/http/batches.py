"""The Batch API in OpenAI's shape (/v1/files, /v1/batches), so the openai SDK's `files` and
`batches` clients work unchanged. A caller sees and changes only its own files and batches;
another caller's id answers exactly like an unknown one."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.types import Message

from router.accounting.batches import BatchInputError, BatchStore, BatchStoreError, FileTooLarge
from router.errors import InvalidRequest, NotFound, PayloadTooLarge
from router.http.inbound import read_json
from router.routing.auth import Principal
from router.routing.batch_scheduler import BatchScheduler

if TYPE_CHECKING:
    from router.runtime import Runtime

# Room for the multipart framing and the purpose field around the file itself.
_FORM_OVERHEAD = 64 * 1024


def batch_routes(rt: Runtime, store: BatchStore, scheduler: BatchScheduler) -> APIRouter:
    r = APIRouter()

    def caller(request: Request) -> Principal:
        return rt.auth.caller(request.headers)

    @r.post("/v1/files")
    async def upload(request: Request) -> dict[str, Any]:
        """multipart/form-data: `file` (JSONL) and `purpose` (batch)."""
        who = caller(request)
        limit = rt.config.batches.max_file_bytes + _FORM_OVERHEAD
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(rt.config.batches.max_file_bytes)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidRequest("upload the file as multipart/form-data with the fields "
                                 "'file' and 'purpose'", param="file", code="invalid_upload")
        bounded = Request(request.scope, _bounded(request.receive, limit))
        # Starlette spools the file part to a temporary file past 1 MB: never whole in memory.
        try:
            form = await bounded.form(max_files=1, max_fields=8)
        except _OverLimit:
            raise _too_large(rt.config.batches.max_file_bytes) from None
        except Exception as exc:  # a malformed multipart body
            raise InvalidRequest(f"the upload is not valid multipart/form-data: "
                                 f"{type(exc).__name__}", param="file",
                                 code="invalid_upload") from None
        try:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise InvalidRequest("purpose must be 'batch' (the only purpose this gateway "
                                     "stores files for)", param="purpose",
                                     code="invalid_purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("the form has no 'file' part", param="file",
                                     code="missing_file")
            try:
                return await asyncio.to_thread(store.save_file, who.name,
                                               upload.filename or "upload.jsonl", purpose,
                                               upload.file)
            except FileTooLarge:
                raise _too_large(rt.config.batches.max_file_bytes) from None
            except BatchStoreError as exc:
                raise _invalid(exc) from None
        finally:
            await form.close()

    @r.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None) -> dict[str, Any]:
        who = caller(request)
        data = await asyncio.to_thread(store.list_files, who.name, purpose)
        return {"object": "list", "data": data, "has_more": False}

    @r.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> dict[str, Any]:
        return await _own_file(store, caller(request), file_id)

    @r.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Response:
        await _own_file(store, caller(request), file_id)
        # Streamed from disk, a chunk at a time.
        return FileResponse(store.path(file_id), media_type="application/jsonl")

    @r.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
        who = caller(request)
        if not await asyncio.to_thread(store.delete_file, who.name, file_id):
            raise _no_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @r.post("/v1/batches")
    async def create(request: Request) -> dict[str, Any]:
        who = caller(request)
        body = await read_json(request.receive, rt.config.server.max_body_bytes,
                               request.headers)
        input_file = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window", "24h")
        metadata = body.get("metadata")
        if not isinstance(input_file, str):
            raise InvalidRequest("input_file_id must be a file id", param="input_file_id")
        if not isinstance(endpoint, str):
            raise InvalidRequest("endpoint must be /v1/chat/completions or /v1/embeddings",
                                 param="endpoint")
        if not isinstance(window, str):
            raise InvalidRequest("completion_window must be a string such as '24h'",
                                 param="completion_window")
        if metadata is not None and not (
                isinstance(metadata, dict) and len(metadata) <= 16
                and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                        and len(v) <= 512 for k, v in metadata.items())):
            raise InvalidRequest("metadata is at most 16 string keys (64 characters) with "
                                 "string values (512 characters)", param="metadata")
        aliases = who.policy.aliases
        catalog = rt.catalog

        def check(line_body: dict[str, Any]) -> tuple[str, str] | None:
            model = line_body["model"]
            if catalog.backends(model) is None or (aliases is not None and model not in aliases):
                # Not allowed answers like not there, as on the routed endpoints.
                return "model_not_found", f"the model {model[:100]!r} does not exist"
            return None

        try:
            batch = await asyncio.to_thread(store.create_batch, who.name, input_file,
                                            endpoint, window, metadata, check)
        except BatchStoreError as exc:
            if exc.code == "file_not_found":
                raise _no_file(input_file) from None
            raise _invalid(exc) from None
        scheduler.wake()
        return batch

    @r.get("/v1/batches")
    async def list_batches(request: Request, after: str | None = None,
                           limit: int = 20) -> dict[str, Any]:
        who = caller(request)
        if not 1 <= limit <= 100:
            raise InvalidRequest("limit must be between 1 and 100", param="limit")
        data = await asyncio.to_thread(store.list_batches, who.name, after, limit + 1)
        more = len(data) > limit
        data = data[:limit]
        return {"object": "list", "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @r.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
        who = caller(request)
        batch = await asyncio.to_thread(store.get_batch, who.name, batch_id)
        if batch is None:
            raise _no_batch(batch_id)
        # The scheduler's view while it works on the batch: pace, plan, deadline at risk.
        state = scheduler.schedule(batch_id)
        return batch if state is None else {**batch, "spillover": state}

    @r.post("/v1/batches/{batch_id}/cancel")
    async def cancel(request: Request, batch_id: str) -> dict[str, Any]:
        who = caller(request)
        batch = await asyncio.to_thread(store.cancel, who.name, batch_id)
        if batch is None:
            raise _no_batch(batch_id)
        scheduler.wake()
        return batch

    return r


async def _own_file(store: BatchStore, who: Principal, file_id: str) -> dict[str, Any]:
    f = await asyncio.to_thread(store.get_file, who.name, file_id)
    if f is None:
        raise _no_file(file_id)
    return f


def _no_file(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id[:80]}", param="id", code="file_not_found")


def _no_batch(batch_id: str) -> NotFound:
    return NotFound(f"No such Batch object: {batch_id[:80]}", param="id",
                    code="batch_not_found")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the file is over the {limit} bytes a file may have "
                           "(batches.max_file_bytes)", param="file", code="file_too_large")


def _invalid(exc: BatchStoreError) -> InvalidRequest:
    err = InvalidRequest(exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, BatchInputError):
        err.message += "; lines: " + ", ".join(str(p.line) for p in exc.problems)
    return err


class _OverLimit(Exception):
    pass


def _bounded(receive: Any, limit: int) -> Any:
    """`receive`, refusing once more than `limit` bytes of body came (a client that lies
    about, or does not send, its content-length)."""
    seen = 0

    async def inner() -> Message:
        nonlocal seen
        message: Message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _OverLimit
        return message

    return inner

"""The relayed event stream as an ASGI response, lighter than Starlette's.

Starlette's StreamingResponse starts a task group with a task for the body and one that
listens for the caller hanging up, so the first event waits for a new task to be
scheduled. Here the body is written from the request's own task, at once, and a small
watcher task cancels that task when the caller goes away: the relay then closes the
upstream (which stops the engine) and books what was generated.
"""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStream(StreamingResponse):
    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        hung_up = False

        async def watch() -> None:
            nonlocal hung_up
            while (await receive())["type"] != "http.disconnect":
                pass
            hung_up = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not hung_up:
                raise  # a shutdown, not ours to swallow
            task.uncancel()
        except OSError:
            pass  # ASGI 2.4 servers raise this from send() once the caller is gone
        finally:
            watcher.cancel()
            # Interrupted or not, the relay's cleanup (closing the upstream, booking the
            # call) runs now, not whenever the generator is collected.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()

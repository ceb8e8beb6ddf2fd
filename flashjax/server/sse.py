"""Server-sent events: the wire format, and a response that notices a client leaving at once.

Starlette's StreamingResponse under an ASGI 2.4 server learns of a disconnect only when a later write
fails, and a request whose text is held back (a possible stop string) or still queued writes nothing
for a while. This response watches for `http.disconnect` the whole time, and whatever ends the stream
(the end of the events, the client leaving, the server cancelling the task at shutdown) calls
`on_close`, which cancels the request in the engine.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"  # a comment line: clients ignore it; proxies see the stream is alive

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def event(data: dict) -> bytes:
    # Compact JSON on one line: a `data:` field cannot hold a raw newline, and json.dumps escapes them.
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(events, headers=HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away between our watch and a write
                    pass
                group.cancel_scope.cancel()
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

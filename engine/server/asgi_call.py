"""Run one HTTP request through an ASGI app in this process and hand back its response as it is produced.

A Ray Serve replica uses this to serve a forwarded request with the very same app (`create_app`) the
single-process server runs, so both answer every route identically.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ForwardedRequest:
    """What an HTTP request is made of, picklable (ingress -> replica)."""

    method: str
    path: str
    body: bytes = b""
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    client: tuple[str, int] | None = None


@dataclass
class ResponseHead:
    """A response's status and headers with its first body chunk; `more`: further chunks follow."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    more: bool = False

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


async def call_asgi(app, request: ForwardedRequest) -> AsyncIterator[ResponseHead | bytes]:
    """Yield the response's ResponseHead (status, headers, first body chunk), then each further body chunk.

    Closing the iterator early (the caller went away) tells the app that its client disconnected and waits
    for the app to finish, so whatever it cleans up on a disconnect (aborting engine requests) is done."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    request_sent = False

    async def receive() -> dict:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if disconnected.is_set():
            raise OSError("the client disconnected")
        await messages.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
        "root_path": "", "query_string": request.query_string, "headers": list(request.headers),
        "client": request.client, "server": ("127.0.0.1", 0),
    }
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    head: ResponseHead | None = None
    head_sent = False
    try:
        while True:
            message = await messages.get()
            if message is None:  # the app returned (or raised) without finishing its response
                task.result()
                raise RuntimeError("the app ended without a complete response")
            if message["type"] == "http.response.start":
                head = ResponseHead(message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body" and head is not None:
                body, more = bytes(message.get("body", b"")), bool(message.get("more_body", False))
                if not head_sent:
                    head.body, head.more, head_sent = body, more, True
                    yield head
                elif body:
                    yield body
                if not more:
                    break
    finally:
        disconnected.set()
        await asyncio.wait([task], timeout=5.0)  # let it clean up (abort its engine requests), then stop it
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


"""The gate every HTTP request passes before the app sees it (a pure ASGI middleware):

- draining (after SIGTERM): new requests get 503 while those in flight finish;
- a body over `max_body_bytes` gets 413, from its Content-Length before reading, or as it arrives;
- the whole body must arrive within `read_timeout_s`, else 408 (a slow-loris body cannot hold a
  worker for ever);
- `in_flight` counts the requests being answered (the drain waits for it to reach 0).

The app then gets the body in one piece; later `receive()` calls go to the client connection, so
a client that disconnects is still seen (a streaming response stops and frees its slot).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from vitune.serving.errors import ApiError, too_large, unavailable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ALWAYS_OPEN = ("/health", "/metrics")  # answered while draining too


@dataclass
class Lifecycle:
    draining: bool = False
    in_flight: int = 0


class _Disconnected(Exception):
    pass


async def send_error(send: Send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Gate:
    def __init__(self, app, lifecycle: Lifecycle, max_body_bytes: int, read_timeout_s: float):
        self.app, self.life = app, lifecycle
        self.max_body_bytes, self.read_timeout_s = max_body_bytes, read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.life.draining and scope["path"] not in ALWAYS_OPEN:
            return await send_error(send, unavailable("the server is shutting down; retry on another instance"))
        self.life.in_flight += 1
        try:
            await self._admit(scope, receive, send)
        finally:
            self.life.in_flight -= 1

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = self._declared_size_error(scope)
        if err is not None:
            return await send_error(send, err)
        try:
            body = await asyncio.wait_for(self._read(receive), self.read_timeout_s)
        except TimeoutError:
            return await send_error(send, ApiError(408, f"the request body did not arrive within "
                                                        f"{self.read_timeout_s:g} s", None, "request_timeout"))
        except ApiError as e:
            return await send_error(send, e)
        except _Disconnected:
            return
        given = False

        async def replay() -> dict:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    def _declared_size_error(self, scope: Scope) -> ApiError | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return ApiError(400, "the Content-Length header is not a number", None, "invalid_header")
                if size > self.max_body_bytes:
                    return self._too_large(size)
        return None

    def _too_large(self, size: int) -> ApiError:
        return too_large(f"the request body is {size:,} bytes or more, over this server's limit of "
                         f"{self.max_body_bytes:,} bytes")

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

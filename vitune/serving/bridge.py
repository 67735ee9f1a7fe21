"""From the engine thread to the event loop: a request's events land in a deque, and the loop is
woken once per batch of them (not once per token: under load a wake-up finds several deltas,
which the stream sends as one chunk). `next_event` waits for the next one while watching the
client, so a request whose client went away is cancelled (its KV cache slot freed) instead of
decoded to the end for nobody.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable

from vitune.serving.engine import Delta, Event, Handle


class ClientGone(Exception):
    pass


class EventQueue:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: deque[Event] = deque()
        self.ready = asyncio.Event()
        self._wake_pending = False

    def emit(self, event: Event) -> None:
        """Called on the engine thread; never blocks, never raises (a closed loop drops the event)."""
        self.events.append(event)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:
                pass

    def _wake(self) -> None:
        self._wake_pending = False  # before set(): an event emitted from now on schedules a new wake-up
        self.ready.set()

    async def get(self) -> Event:
        while not self.events:
            self.ready.clear()
            if self.events:
                break
            await self.ready.wait()
        return self.events.popleft()

    def more_text(self) -> str:
        """The text of the deltas already queued behind the one just taken (without waiting)."""
        pieces = []
        while self.events and isinstance(self.events[0], Delta):
            pieces.append(self.events.popleft().text)
        return "".join(pieces)


class DisconnectWatch:
    """A task that ends when the client disconnects (reading the ASGI `receive` after the body)."""

    def __init__(self, receive: Callable[[], Awaitable[dict]]):
        self.task = asyncio.ensure_future(self._watch(receive))

    @staticmethod
    async def _watch(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    def close(self) -> None:
        self.task.cancel()


async def next_event(events: EventQueue, watch: DisconnectWatch, handle: Handle) -> Event:
    """The request's next event; `ClientGone` (and the request cancelled) if the client left first."""
    if events.events:
        return events.events.popleft()
    get = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({get, watch.task}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    handle.cancel()
    raise ClientGone

"""Running the app under uvicorn: the socket, HTTP limits, and a graceful drain on SIGTERM.

- The socket is bound before uvicorn starts (`--port 0` picks a free port; the line printed says
  which), its connections without Nagle's algorithm (streamed chunks leave at once), HTTP/1.1
  via h11, headers capped at `MAX_HEADER_BYTES`, idle keep-alive connections closed after
  `KEEP_ALIVE_S`, at most `max_queue + max_batch + SPARE_CONNECTIONS` concurrent
  connections (more get 503 from uvicorn). The body limit and the body read timeout are the
  app's own (guard.py), so they hold under any ASGI server.
- SIGTERM (or the first Ctrl-C): the server keeps listening but answers new requests 503
  (draining) while those in flight finish, for at most `drain_timeout_s`; then uvicorn closes,
  cancelling what is left after `GRACE_S`, and the engine stops. A second signal stops at once.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from vitune.serving.guard import Lifecycle

MAX_HEADER_BYTES = 64 * 1024
KEEP_ALIVE_S = 5
GRACE_S = 2
SPARE_CONNECTIONS = 16


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol is named (`IPPROTO_TCP`, not 0) because asyncio turns
    Nagle's algorithm off (TCP_NODELAY) only on connections of such sockets: with it on, a stream's
    small writes wait for the client's delayed ACK (about 40 ms each) on keep-alive connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


@dataclass
class Drain:
    server: uvicorn.Server
    lifecycle: Lifecycle
    timeout_s: float

    def on_signal(self, sig: int, _frame) -> None:
        if self.lifecycle.draining:
            self.server.should_exit = self.server.force_exit = True
            return
        self.lifecycle.draining = True
        print(f"vitune serve: {signal.Signals(sig).name}: draining ({self.lifecycle.in_flight} request(s) in "
              f"flight, at most {self.timeout_s:g} s); new requests get 503", file=sys.stderr, flush=True)
        threading.Thread(target=self._wait, name="vitune-drain", daemon=True).start()

    def _wait(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.lifecycle.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.server.should_exit = True


def make_server(app: FastAPI, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for `app` (from `api.create_app`) whose SIGTERM / Ctrl-C drains first."""
    state = app.state.server
    settings = state.settings
    config = uvicorn.Config(app, log_level=log_level, http="h11", loop="asyncio", lifespan="on",
                            timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=GRACE_S,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            limit_concurrency=settings.max_queue + settings.max_batch + SPARE_CONNECTIONS,
                            access_log=False)
    server = uvicorn.Server(config)
    server.handle_exit = Drain(server, state.lifecycle, settings.drain_timeout_s).on_signal  # see capture_signals
    return server


def serve(app: FastAPI, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve `app` on the bound `sock` until a signal drains it (signals: main thread only)."""
    make_server(app, log_level).run(sockets=[sock])

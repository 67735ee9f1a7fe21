"""Training guards: what stops a run, and how it stops without losing work.

- `TrainingError`: the run cannot go on (a non-finite loss or gradient, a resume that does not
  fit); the message names the step or the fields, and the last good state stays on disk.
- `Interrupted`: SIGINT (Ctrl-C) or SIGTERM arrived; the loop saved the state at the end of the
  step in progress and says how to resume. `StopSignals` turns the signals into a flag the loop
  reads between steps; a second signal of the same kind stops at once (the state on disk is then
  the last periodic save).
- `SaveClock`: when the periodic save is due (every N steps and/or every M minutes).
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType


class TrainingError(RuntimeError):
    """The run stopped: the message says at which step and why, and where the last good state is."""


class Interrupted(Exception):
    """A signal stopped the run after its state was saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


SIGNALS = {signal.SIGINT: ("SIGINT (Ctrl-C)", 130), signal.SIGTERM: ("SIGTERM", 143)}


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.requested:` save and raise `stop.interrupted(...)`.

    Only the main thread can take signals; elsewhere (a notebook worker thread, say) the flag
    simply never rises and the default behaviour stays.
    """

    def __init__(self):
        self.received: int | None = None
        self._before: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signum:  # the second one: stop now
            signal.signal(signum, self._before.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._before[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)
        self._before.clear()

    def interrupted(self, message: str) -> Interrupted:
        """Under torchrun, a process that got no signal itself stops with the others (SIGTERM's code)."""
        name, code = SIGNALS.get(self.received, ("a stop signal to another process of the run", 143))
        return Interrupted(f"{name} received: {message}", code)


class SaveClock:
    """Periodic saves: due every `every_steps` steps (0: never by steps) and every `every_minutes`
    minutes of wall time since the last save (0: never by time)."""

    def __init__(self, every_steps: int, every_minutes: float, clock=time.monotonic):
        self.every_steps, self.every_s, self.clock = every_steps, every_minutes * 60.0, clock
        self.last = clock()

    def due(self, step: int) -> bool:
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = self.every_s > 0 and self.clock() - self.last >= self.every_s
        return by_steps or by_time

    def saved(self) -> None:
        self.last = self.clock()

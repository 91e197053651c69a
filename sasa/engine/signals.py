"""``GracefulStop``: SIGINT / SIGTERM become a flag the training loop polls, so it can checkpoint and exit cleanly.

The first signal sets the flag; a second SIGINT restores Python's ``KeyboardInterrupt``. Handlers are installed only
in the main thread and restored on exit. Under ``torchrun`` every rank gets the signal; the loop reduces the flag
across ranks before stopping, so that no rank waits forever in a collective.
"""

from __future__ import annotations

import signal
import threading


class GracefulStop:
    """Context manager turning ``signals`` into ``self.requested`` (``True`` once one arrived)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Set the flag by hand (tests, or a loop that wants to stop for its own reasons)."""
        self.signum = signum

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self) -> GracefulStop:  # noqa: PYI034  (typing.Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

"""What stops a training run early, shared by both trainers (pure Python: the PyTorch side
imports no JAX): a non-finite step, and a signal asking to save and stop."""

from __future__ import annotations

import signal
import threading


class NonFiniteError(RuntimeError):
    """A step's loss or gradient was NaN or infinite; its update was not applied."""


class SignalStop:
    """SIGTERM or a first Ctrl-C ask the run to save and stop (`requested`: the first signal's
    name, which decides the exit status); a Ctrl-C after such a request interrupts at once. The handlers are installed by `install()` (from the main
    thread only) or on entering the context, and put back by `restore()` or on leaving it. Each
    trainer agrees on the request over its processes (`agreed`)."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():  # (None: a handler set outside Python; the default then)
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        self._old = {}

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        self.restore()

    def agreed(self, asked: list[int]) -> str | None:
        """The request as every process sees it, given the processes `asked` where one was made
        (one process: [0] or []): a signal to any one of them stops all at the same step (the
        save is collective: a process that saved alone would hang the others)."""
        return (self.requested or f"a signal to process {asked[0]}") if asked else None

"""Stopping long work at a safe point on SIGTERM / SIGINT (preemption, `kill`, Ctrl-C).

    with interrupts.stop_requests() as stop:
        for item in work:
            do(item)                      # never cut in the middle
            if stop.requested:
                save()                    # a checkpoint, the queued store part, ...
                raise stop.error("stopped after 12 images; rerun the same command")

Inside the block SIGTERM and SIGINT only record the request (`stop.signum`); the work
checks it at its next safe point (a training step, an image), saves, and raises
`stop.error(...)`: `Terminated` (SIGTERM) or `Interrupted` (SIGINT), whose `exit_code`
is the shell's 128 + signal number (`EXIT_TERMINATED` 143, `EXIT_INTERRUPTED` 130), so a
scheduler sees a preempted run, not a crash. A second SIGINT while stopping raises
KeyboardInterrupt at once (the default behaviour: the user insists). The previous
handlers come back when the block ends. Signal handlers can only be installed by the
main thread: elsewhere the block records nothing (signals keep their handlers).

Imports nothing from delg_tf, so that every room can use it.
"""

import contextlib
import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The shell's exit status of a process killed by a signal: 128 + its number.
SIGNAL_EXIT_BASE = 128
EXIT_TERMINATED = SIGNAL_EXIT_BASE + signal.SIGTERM  # 143
EXIT_INTERRUPTED = SIGNAL_EXIT_BASE + signal.SIGINT  # 130


class Stopped(Exception):
    """The work stopped at a safe point on a signal, after saving (the message says where
    and how to resume).

    Attributes:
      signum: the signal received.
      exit_code: 128 + signum.
    """

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = SIGNAL_EXIT_BASE + self.signum


class Terminated(Stopped):
    """Stopped on SIGTERM (exit code `EXIT_TERMINATED`)."""


class Interrupted(Stopped):
    """Stopped on SIGINT (exit code `EXIT_INTERRUPTED`)."""


def signal_name(signum) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """The signal received inside a `stop_requests` block, if any.

    Attributes:
      signum: the first signal received (None: none yet).
    """

    def __init__(self):
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.requested else ""

    def error(self, message) -> Stopped:
        """`Terminated` / `Interrupted` (by the signal received) with `message`."""
        cls = Interrupted if self.signum == signal.SIGINT else Terminated
        return cls(message, self.signum)

    def _handle(self, signum, frame):
        del frame
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now.
        if self.signum is None:
            self.signum = signum


@contextlib.contextmanager
def stop_requests(signals=SIGNALS):
    """Yields a `StopRequest` recording `signals` (see the module doc)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.signal(signum, stop._handle) for signum in signals}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

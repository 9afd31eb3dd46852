"""Ctrl-C and SIGTERM as an exception that waits for the output files to be consistent.

While a run holds ``interruptible()``, SIGINT and SIGTERM raise ``Interrupted``; inside ``critical()``
(writing a batch and its journal records, rebuilding the COCO files) the signal is held back and
raised when the section ends, so an interruption never leaves a file that disagrees with the journal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(BaseException):
    """The run was asked to stop by a signal (a BaseException, as KeyboardInterrupt is)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    depth = 0  # nested critical sections
    pending: int | None = None
    raised: int | None = None  # the signal last raised as ``Interrupted`` in this block


_STATE = _State()
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _handler(signum: int, _frame) -> None:
    if _STATE.depth:
        _STATE.pending = _STATE.pending or signum
    else:
        _STATE.raised = signum
        raise Interrupted(signum)


def raise_if_lost() -> None:
    """Raise again a signal whose ``Interrupted`` never reached the run: Python swallows an exception
    raised inside an object's ``__del__`` or a callback, where a signal may land (a Ctrl-C then went
    unheard: seen once in ~50 tries). A run calls this where it would stop."""
    if _STATE.raised is not None:
        raise Interrupted(_STATE.raised)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` inside this block (main thread only; elsewhere, and for
    signals already ignored, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _STATE.pending = _STATE.raised = None


@contextmanager
def critical() -> Iterator[None]:
    """Hold signals back until this block ends; then raise the first one that came."""
    _STATE.depth += 1
    try:
        yield
    finally:
        _STATE.depth -= 1
    if not _STATE.depth and _STATE.pending is not None:
        signum, _STATE.pending = _STATE.pending, None
        raise Interrupted(signum)

"""Helper processes that answer calls in the order they were made, with no thread in the caller.

Decoding images and reading shards ahead both send a stream of calls to a few processes and take the
answers back in order. ``concurrent.futures.ProcessPoolExecutor`` runs two threads of its own in the
caller for that (a feeder and a manager) and every answer wakes both: where answers come slowly (a
store's latency), the driver spent more CPU on those thread switches than on the answers themselves
(docs/scaling.md). Here each process has a pipe for calls and one for answers, and calls go to the
processes in turn, so the oldest call's answer is the next one on its process's pipe: the caller reads
it itself, and sleeps in that read while it waits.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


class PoolBroken(Exception):
    """A helper process ended (a crash, the machine's memory) before it answered."""


@dataclass
class _Helper:
    process: multiprocessing.process.BaseProcess
    calls: Connection  # this side writes
    answers: Connection  # this side reads


class OrderedPool:
    """``processes`` helper processes; ``submit`` a call, then ``result`` answers the oldest one not
    answered yet. Once a process is found gone, every call not answered yet raises ``PoolBroken``."""

    def __init__(self, processes: int):
        context = multiprocessing.get_context("spawn")  # never fork a process holding CUDA/threads
        self.helpers: list[_Helper] = []
        for _ in range(processes):
            calls_read, calls_write = context.Pipe(duplex=False)
            answers_read, answers_write = context.Pipe(duplex=False)
            process = context.Process(target=_serve, args=(calls_read, answers_write), daemon=True)
            process.start()
            # The process holds these ends now; with ours closed, its death reads as EOF on ours.
            calls_read.close()
            answers_write.close()
            self.helpers.append(_Helper(process, calls_write, answers_read))
        self.unanswered: deque[_Helper] = deque()  # the process of each call not answered yet, oldest first
        self.turn = 0
        self.broken = False

    def __len__(self) -> int:
        return len(self.unanswered)

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Call ``function(*args)`` in the next helper process (functions and arguments must pickle)."""
        helper = self.helpers[self.turn]
        self.turn = (self.turn + 1) % len(self.helpers)
        self.unanswered.append(helper)
        with contextlib.suppress(OSError):  # its process is gone: found as EOF where its answer is read
            helper.calls.send((function, args))

    def result(self) -> Any:
        """The oldest unanswered call's return value (or its exception, raised here)."""
        helper = self.unanswered.popleft()
        if self.broken:
            raise PoolBroken("a helper process ended")
        try:
            returned, value = helper.answers.recv()
        except (EOFError, OSError):
            self.broken = True
            raise PoolBroken("a helper process ended") from None
        if not returned:
            raise value
        return value

    def close(self) -> None:
        """Let the processes go: each ends once it sees its pipes closed (a call under way is not waited
        for). Finished processes are reaped when the next ones start."""
        for helper in self.helpers:
            helper.calls.close()
            helper.answers.close()


def _serve(calls: Connection, answers: Connection) -> None:
    """A helper process: answer calls in the order they come until the caller closes its end."""
    _follow_the_caller()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    # Calls are taken off the pipe by a thread of their own: a caller blocked writing a call (a stream's
    # image bytes fill a pipe) while this process is blocked writing an answer that the caller has not
    # reached yet would wait for each other forever.
    threading.Thread(target=_receive, args=(calls, inbox), daemon=True).start()
    while (call := inbox.get()) is not None:
        function, args = call
        try:
            answer = (True, function(*args))
        except Exception as exc:
            answer = (False, exc)
        try:
            answers.send(answer)
        except OSError:  # the caller closed its end: the run is over
            return
        except Exception as exc:  # an answer that does not pickle: its reason is the answer
            answers.send((False, RuntimeError(f"a helper process's answer did not pickle: {exc}")))


def _follow_the_caller() -> None:
    """Ctrl-C is the caller's to handle (a terminal sends it to every process of the job), and the process
    ends with its caller, even one killed with SIGKILL: its pipes then close, but a call under way (a
    store that does not answer) would hold the process on without this watch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    caller = os.getppid()

    def watch() -> None:
        while os.getppid() == caller:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="caller-watch", daemon=True).start()


def _receive(calls: Connection, inbox: queue.SimpleQueue) -> None:
    while True:
        try:
            inbox.put(calls.recv())
        except (EOFError, OSError):
            inbox.put(None)
            return
        except Exception as exc:  # a call that does not unpickle here: its answer is the reason
            inbox.put((_raise, (exc,)))


def _raise(exc: Exception) -> None:
    raise exc

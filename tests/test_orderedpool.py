"""Helper processes that answer in call order (``OrderedPool``): the order holds across processes, a
call's exception is raised by the caller and the pool goes on, large calls and answers in flight
together do not wait on each other forever, and a process that dies breaks the pool in one exception."""

from __future__ import annotations

import os
import threading

import pytest

from florence_cli.orderedpool import OrderedPool, PoolBroken

from .pool_calls import busy, echo_pid, fail_on_odd, repeat, unpicklable


def test_answers_come_in_call_order_from_every_process():
    pool = OrderedPool(3)
    try:
        for number in range(20):
            pool.submit(busy, number, 200_000 * (number % 4))  # uneven work per call
        assert len(pool) == 20
        assert [pool.result() for _ in range(20)] == list(range(20))
        assert len(pool) == 0
        for _ in range(3):
            pool.submit(echo_pid)
        assert len({pool.result() for _ in range(3)}) == 3  # calls go to every process in turn
    finally:
        pool.close()


def test_a_failed_call_is_raised_here_and_the_pool_goes_on():
    pool = OrderedPool(2)
    try:
        for number in range(4):
            pool.submit(fail_on_odd, number)
        pool.submit(unpicklable)
        assert pool.result() == 0
        with pytest.raises(ValueError, match="odd: 1"):
            pool.result()
        assert pool.result() == 2
        with pytest.raises(ValueError, match="odd: 3"):
            pool.result()
        with pytest.raises(RuntimeError, match="did not pickle"):
            pool.result()
        pool.submit(fail_on_odd, 6)
        assert pool.result() == 6 and not pool.broken
    finally:
        pool.close()


def test_large_calls_and_answers_in_flight_together_finish():
    # One process holds three 4 MB calls while its 4 MB answers wait to be read: pipes hold 64 KB, so a
    # process that read its next call only after writing its answer would wait on the caller forever.
    pool = OrderedPool(1)
    answers: list[int] = []
    finished = threading.Event()

    def exchange() -> None:
        payload = b"x" * (4 << 20)
        for _ in range(3):
            pool.submit(repeat, payload, 1)
        answers.extend(len(pool.result()) for _ in range(3))
        finished.set()

    try:
        threading.Thread(target=exchange, daemon=True).start()
        assert finished.wait(120), "the caller and the helper process wait on each other"
        assert answers == [4 << 20] * 3
    finally:
        pool.close()


def test_a_dead_process_breaks_the_pool_for_every_unanswered_call():
    pool = OrderedPool(2)
    try:
        for word in ("one", "two"):  # one call each, so the next goes to the first process again
            pool.submit(repeat, word, 1)
        assert [pool.result(), pool.result()] == ["one", "two"]
        victim = pool.helpers[1].process
        victim.kill()
        victim.join()
        for number in range(4):
            pool.submit(repeat, number, 1)
        assert pool.result() == 0  # the live process answers its call
        for _ in range(3):  # the dead one's call is the first lost; the pool is broken from there
            with pytest.raises(PoolBroken):
                pool.result()
        assert pool.broken and len(pool) == 0
    finally:
        pool.close()


def test_closing_ends_the_processes():
    pool = OrderedPool(2)
    pool.submit(echo_pid)
    pids = {pool.result()}
    pool.close()
    for helper in pool.helpers:
        helper.process.join(120)
        assert helper.process.exitcode == 0
    assert pids <= {helper.process.pid for helper in pool.helpers} and os.getpid() not in pids

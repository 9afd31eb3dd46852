"""Calls for the helper-process tests (a module, so spawned processes can import them)."""

import os


def busy(number: int, work: int) -> int:
    """``number``, after ``work`` steps of busy work."""
    total = 0
    for step in range(work):
        total += step
    return number


def repeat(value, times: int):
    return value * times


def echo_pid() -> int:
    return os.getpid()


def fail_on_odd(number: int) -> int:
    if number % 2:
        raise ValueError(f"odd: {number}")
    return number


def unpicklable():
    return lambda: None

"""Assertions shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path


def assert_same_answer(ours, theirs, where: str = "") -> None:
    """Our parsed result equals transformers' one, given that it truncates coordinates to int and
    we keep the float bin centre (``theirs <= ours < theirs + 1``) and non-ASCII label text; our extra
    ``scores`` are ignored."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), where
        assert set(theirs) <= set(ours), where
        for key in theirs:
            assert_same_answer(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_answer(a, b, f"{where}[{i}]")
    elif isinstance(theirs, (int, float)) and not isinstance(theirs, bool):
        assert theirs - 1e-3 <= ours < theirs + 1 + 1e-3, f"{where}: {ours} vs {theirs}"
    elif isinstance(ours, str) and ours != theirs:
        # transformers drops non-ASCII from labels (encode("ascii", "ignore")); we keep it
        assert not ours.isascii() and ours.encode("ascii", "ignore").decode() == theirs, (
            f"{where}: {ours!r} vs {theirs!r}"
        )
    else:
        assert ours == theirs, f"{where}: {ours!r} vs {theirs!r}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def output_files(out: Path) -> dict[str, bytes]:
    """The files a run leaves for its user: everything but its state folder and the errors log."""
    files = [
        p for p in out.rglob("*") if p.is_file() and ".florence" not in p.parts and p.name != "errors.jsonl"
    ]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def kill_mid_run(command: list[str], journal: Path, min_lines: int, env: dict | None = None) -> int:
    """Start ``command`` (in ``env``), ``kill -9`` it once its journal holds ``min_lines`` lines; return
    how many."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    # stderr to a file: a pipe nobody reads fills up with a chatty run's warnings and stalls it
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stderr=stderr, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= min_lines:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return journal.read_bytes().count(b"\n")

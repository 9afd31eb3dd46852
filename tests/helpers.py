"""Assertions and recorders shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from florence_cli import beam
from florence_cli.graphs import StaticDecoder


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


def kill_mid_run(
    command: list[str], journal: Path, min_lines: int, env: dict | None = None, stdin: bytes | None = None
) -> int:
    """Start ``command`` (in ``env``), ``kill -9`` it once its journal holds ``min_lines`` lines; return
    how many. With ``stdin`` (some of the paths a ``-`` input reads), the pipe stays open until the kill:
    the run waits for more paths, so the kill lands mid-run whatever the machine's load."""
    import os
    import signal
    import subprocess
    import tempfile

    # stderr to a file: a pipe nobody reads fills up with a chatty run's warnings and stalls it
    with tempfile.TemporaryFile() as stderr:
        feed = subprocess.PIPE if stdin is not None else None
        process = subprocess.Popen(command, stdin=feed, stderr=stderr, env=env)
    if stdin is not None:
        process.stdin.write(stdin)
        process.stdin.flush()
    wait_until(lambda: process.poll() is not None or line_count(journal) >= min_lines, timeout_s=300)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    if stdin is not None:
        process.stdin.close()
    return line_count(journal)


def line_count(path: Path) -> int:
    """The lines of ``path`` so far (0 before it exists)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_until(condition, timeout_s: float = 600) -> bool:
    """Whether ``condition()`` came true before ``timeout_s`` (a bound for a failing test, not a pace)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar shard, as img2dataset writes one: each sample's members (extension → bytes),
    adjacent, named ``<key>.<extension>``."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return path


def image_bytes(image, form: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, form)
    return buffer.getvalue()


class Steps:
    """Records, while ``generate`` runs, every step's logits (plain or static) and each static step's
    shape (rows, attended length, encoder length, masked) and position."""

    def __init__(self, monkeypatch):
        self.logits: list[torch.Tensor] = []
        self.shapes: list[tuple] = []
        self.positions: list[int] = []
        for kind in (beam._CacheSteps, StaticDecoder):
            monkeypatch.setattr(kind, "logits", self._recorded(kind.logits))
        step = StaticDecoder._step

        def recorded_step(decoder, *shape):
            self.shapes.append(shape)
            self.positions.append(int(decoder.buffers.position))
            step(decoder, *shape)

        monkeypatch.setattr(StaticDecoder, "_step", recorded_step)

    def _recorded(self, logits):
        def recorded(steps, flat_running):
            found = logits(steps, flat_running)
            self.logits.append(found)
            return found

        return recorded

    def generate(self, model, features, prompt: str | list[str], settings, static=None) -> tuple[list, list]:
        """Token ids of each answer (a prompt for all, or one per image), and the logits of each step
        after the first (these and the static steps' shapes and positions are this generation's)."""
        for found in (self.logits, self.shapes, self.positions):
            found.clear()
        prompts = [prompt] * len(features) if isinstance(prompt, str) else prompt
        model.static_decoder = static
        try:
            answers = [g.token_ids for g in model.generate(features, prompts, settings)]
        finally:
            model.static_decoder = None
        return answers, list(self.logits)

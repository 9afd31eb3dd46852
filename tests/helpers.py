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

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


def assert_same_records(ours: list[dict], theirs: list[dict]) -> None:
    """JSONL records equal, but for scores: float sums over a batch may differ in the last bits."""
    import pytest

    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a["raw"] == b["raw"]
        strip = {k: v for k, v in a.items() if k != "result"}
        assert strip == {k: v for k, v in b.items() if k != "result"}
        if isinstance(a["result"], dict):
            for key, value in a["result"].items():
                if key.endswith("scores"):
                    assert value == pytest.approx(b["result"][key], rel=1e-4)
                else:
                    assert value == b["result"][key]
        else:
            assert a["result"] == b["result"]

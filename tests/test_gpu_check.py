"""benchmarks/gpu_check.sh on a cold machine: an environment it cannot run in stops it at once, in one
line and with exit status 2, before anything is built or timed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _check(tmp_path: Path, wheels: Path) -> subprocess.CompletedProcess:
    """The script, as on the GPU image: an importable transformers 5.17 (a stand-in) and ``wheels``."""
    old = tmp_path / "old" / "transformers"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text('__version__ = "5.17.0"\n')
    env = {**os.environ, "PYTHONPATH": str(old.parent), "OUT": str(tmp_path / "out"),
           "WHEELS": str(wheels), "TMPDIR": str(tmp_path)}  # fmt: skip
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3: this one
    return subprocess.run(["bash", str(SCRIPT), "--smoke"], env=env, capture_output=True, text=True)


def test_an_old_transformers_and_no_wheels_stop_it_in_one_line(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    result = _check(tmp_path, empty)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"gpu_check: transformers >= 5.24 is needed, this machine has 5.17.0, and {empty}/ holds no "
        "wheels (fill it as docs/performance.md says, and carry it)"
    ]
    assert (tmp_path / "out" / "gpu_check.log").read_text() == result.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()  # nothing built, nothing timed


def test_a_wheel_that_does_not_install_stops_it_in_one_line(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "transformers-5.24.0-py3-none-any.whl").write_bytes(b"not a zip file")
    result = _check(tmp_path, wheels)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"gpu_check: installing {wheels}/ failed: ") and "pip.log" in line

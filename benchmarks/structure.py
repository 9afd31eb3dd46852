"""Facts about the package's structure that anyone can recompute from the tree.

    python benchmarks/structure.py

Prints: import circles between the package's modules (every relative import, wherever it stands);
imports that run back up from a lower layer (runtime imports only; layers as ARCHITECTURE.md names
them); modules without a layer, and layers' modules that do not exist; the longest module and
definition; blocks of six or more lines (blank lines and comments left out, whitespace stripped) that
stand in two places; and the time of ``florence --help``. Exits 1 when the layering is broken (a
circle, an import back up, a module without a layer or a listed one missing): tests/test_structure.py
runs ``layering`` in the suite.
"""

from __future__ import annotations

import ast
import hashlib
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "florence_cli"
# Lower numbers are lower layers; a module imports only from its own layer or below.
# A package's modules take its layer (``ray_engine.stages``: 3).
LAYERS = {
    "tasks": 0, "config": 0, "postconfig": 0, "records": 0,
    "discover": 1, "decode": 1, "jobs": 1, "parse": 1, "journal": 1, "writers": 1, "captions": 1, "outdir": 1,
    "checkpoint": 1, "interrupts": 1, "formats": 1, "tarshards": 1, "pathlist": 1, "storage": 1,
    "shardfiles": 1, "shardlisting": 1, "orderedpool": 1,
    "beam": 2, "exact": 2, "invariant": 2, "graphs": 2, "original": 2, "model": 2, "answer": 2,
    "device_errors": 2, "kernel_check": 2,
    "engine": 3, "runner": 3, "progress": 3, "annotate": 3, "ray_engine": 3, "merge": 3, "evaluate": 3,
    "viz": 3, "testing": 3,
    "cli": 4, "__main__": 4, "__init__": 4,
}  # fmt: skip
WINDOW = 6


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def layer(module: str) -> int:
    return LAYERS.get(module.split(".")[0], -1)


def relative_imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether it runs) for every relative import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [".".join([*target, alias.name]) for alias in node.names] if not node.module else []
            modules = [n for n in names if _exists(n)] or [".".join(target)]
            found += [(m or "__init__", id(node) not in typing_only) for m in modules]
    return found


def _exists(module: str) -> bool:
    base = PACKAGE.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def definitions(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.end_lineno - node.lineno + 1, f"{module_name(path)}.{node.name}")
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]


def repeated_blocks(paths: list[Path]) -> int:
    """Windows of WINDOW code lines whose text stands in more than one place (overlaps merged)."""
    places: dict[bytes, list[tuple[Path, int]]] = defaultdict(list)
    for path in paths:
        lines = [
            (number, line.strip())
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines())
            if line.strip() and not line.strip().startswith("#")
        ]
        for start in range(len(lines) - WINDOW + 1):
            text = "\n".join(line for _, line in lines[start : start + WINDOW])
            places[hashlib.blake2b(text.encode(), digest_size=8).digest()].append((path, lines[start][0]))
    repeated = set()
    for where in places.values():
        if len(where) > 1:
            repeated.update(where)
    blocks, previous = 0, None
    for path, line in sorted(repeated):
        if previous is None or previous[0] != path or line > previous[1] + WINDOW:
            blocks += 1
        previous = (path, line)
    return blocks


def help_seconds(runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "florence_cli", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def import_graph(paths: list[Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Which modules each module imports, and the runtime imports that run back up a layer."""
    graph: dict[str, set[str]] = defaultdict(set)
    upward = []
    for path in paths:
        source = module_name(path)
        for target, runs in relative_imports(path):
            if target != source:
                graph[source].add(target)
            if runs and layer(target) > layer(source) >= 0:
                upward.append(f"{source} -> {target}")
    return graph, upward


def layering() -> dict[str, list]:
    """What breaks the layers: import circles, imports back up, modules without a layer, and modules
    ``LAYERS`` lists that do not exist (each an empty list when all is well)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    graph, upward = import_graph(paths)
    return {
        "import circles": cycles(graph),
        "imports back up from a lower layer": upward,
        "modules without a layer": sorted({module_name(p) for p in paths if layer(module_name(p)) < 0}),
        "listed modules that do not exist": sorted(name for name in LAYERS if not _exists(name)),
    }


def main() -> None:
    paths = sorted(PACKAGE.rglob("*.py"))
    lengths = sorted((len(p.read_text(encoding="utf-8").splitlines()), module_name(p)) for p in paths)
    longest_definition = max(d for p in paths for d in definitions(p))
    print(f"modules: {len(paths)}, lines: {sum(n for n, _ in lengths)}")
    broken = layering()
    for name, found in broken.items():
        print(f"{name}: {len(found)} {found}")
    print(f"longest module: {lengths[-1][1]} ({lengths[-1][0]} lines)")
    print(f"longest definition: {longest_definition[1]} ({longest_definition[0]} lines)")
    print(f"blocks of {WINDOW}+ code lines that stand twice: {repeated_blocks(paths)}")
    print(f"florence --help: {help_seconds():.2f} s (median of 5)")
    code = (
        "import sys, contextlib, io\nfrom florence_cli.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    print(f"imported by florence --help: {imported}")
    sys.exit(1 if any(broken.values()) else 0)


if __name__ == "__main__":
    main()

"""The shape of the package: layers that never climb back up, no import circle, a storage
layer (and the CLI's read-only commands) that load neither torch nor webdataset, and
functions short enough to hold in one's head."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "infobatch_stream"
LAYERS = ["storage", "stages", "pipeline", "cli"]  # each may import only those before it
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (any import statement, TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from . import files`` imports the submodule; ``from .files import X`` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_layer_imports_a_layer_above_it():
    wrong = [(a, b) for a, targets in graph().items() for b in targets
             if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not wrong, wrong


def test_no_import_circle_in_the_package():
    edges = graph()
    # The package's face imports its submodules lazily (and names them for type checkers):
    # it is the root of the graph, not part of any layer.
    edges = {a: {b for b in t if b != "infobatch_stream"} for a, t in edges.items()
             if a != "infobatch_stream"}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_graph_sees_real_imports():
    """A guard for the two tests above: the parser must find the imports that exist."""
    edges = graph()
    assert "infobatch_stream.storage.files" in edges["infobatch_stream.storage.reader"]
    assert "infobatch_stream.storage.reader" in edges["infobatch_stream.storage.commit"]
    assert "infobatch_stream.stages.prune" in edges["infobatch_stream.pipeline.infobatch"]


@pytest.mark.parametrize("code", [
    "import infobatch_stream.storage",
    "import infobatch_stream; infobatch_stream.ScoreStore; infobatch_stream.hash_keys",
    "import infobatch_stream.stages; import infobatch_stream.stages.plan",
    "from infobatch_stream import cli; cli.main(['inspect', STORE, '--json'])",
])
def test_reading_scores_loads_neither_torch_nor_webdataset(tmp_path, code):
    from infobatch_stream.storage import ScoreStore

    store = ScoreStore(str(tmp_path / "scores"))
    with store.writer(0) as writer:
        writer.record(["a", "b"], [1.0, 3.0])
    store.commit(0)
    script = (f"import sys\nSTORE = {store.url!r}\n{code}\n"
              "heavy = [m for m in ('torch', 'webdataset') if m in sys.modules]\n"
              "assert not heavy, heavy\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_training_side_loads_when_first_used():
    code = ("import sys, infobatch_stream as ibs\nassert 'torch' not in sys.modules\n"
            "ibs.InfoBatch\nassert 'torch' in sys.modules and 'webdataset' in sys.modules\n"
            "from webdataset.gopen import gopen_schemes\nassert 's3' in gopen_schemes\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_function_in_the_package_is_over_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long

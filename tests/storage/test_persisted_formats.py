"""Persisted state is Arrow IPC and JSON only: no pickle, nothing executable (DESIGN.md, 7).

One test scans every file a store and its snapshot caches hold after a realistic life
(several commits with retention, run-tagged, late and pending deltas, a second reader's
downloads); another reads the package's source, so no later change can start persisting
pickles.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np

from infobatch_stream.storage import layout
from infobatch_stream.storage.tables import META_KEY

from .conftest import Backend

SRC = Path(__file__).resolve().parents[2] / "src" / "infobatch_stream"
ARROW_MAGIC = b"ARROW1"
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve",
                  "joblib", "pickletools", "copyreg"}


def kind_of(path: str) -> str:
    """'arrow', 'json' or 'lock' (an empty cache lock file); fails on anything else."""
    import pyarrow as pa

    raw = Path(path).read_bytes()
    if raw.startswith(ARROW_MAGIC) and raw.endswith(ARROW_MAGIC):
        with pa.ipc.open_file(pa.BufferReader(raw)) as reader:
            meta = reader.schema.metadata or {}
            layout.strict_json(meta[META_KEY])  # its own description is JSON too
            assert set(meta) == {META_KEY}, (path, set(meta))
        return "arrow"
    if path.endswith(".lock") and raw == b"":
        return "lock"
    assert not raw.startswith(b"\x80"), f"{path} looks like a pickle"
    layout.strict_json(raw)  # raises on anything that is not strict JSON
    return "json"


def test_a_stores_files_are_arrow_and_json_only(backend: Backend) -> None:
    cache_dir = backend.new_cache_dir()
    store = backend.open(cache_dir=cache_dir, keep_snapshots=2)
    rng = np.random.default_rng(0)
    for epoch in range(4):
        for rank in range(2):
            with store.writer(epoch, rank=rank, run_id="job") as writer:
                writer.record([f"k{i}" for i in rng.integers(0, 500, 200)], rng.random(200))
        store.commit(epoch, run_id="job")
    with store.writer(3, rank=1) as late:  # a late delta of a committed epoch
        late.record(["late"], [1.0])
    with store.writer(4) as pending:
        pending.record(["next"], [2.0])
    reader = backend.open(cache_dir=backend.new_cache_dir())
    reader.snapshot(2), reader.snapshot(3)
    kinds: dict[str, list[str]] = {}
    roots = [backend.root] if backend.name == "local" else []
    roots += [cache_dir, reader.cache_dir]
    if backend.name == "s3":  # the remote files, fetched whole
        local = backend.new_cache_dir()
        backend.fs.get(backend.root, local, recursive=True)
        roots.append(local)
    for root in roots:
        for parent, _, names in os.walk(root):
            for name in names:
                path = os.path.join(parent, name)
                kinds.setdefault(kind_of(path), []).append(os.path.relpath(path, root))
    assert set(kinds) <= {"arrow", "json", "lock"}
    assert len(kinds["arrow"]) >= 4 and len(kinds["json"]) >= 3, kinds  # snapshots, deltas, manifests


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module.split(".")[0])
    return names


def test_the_package_never_imports_pickle_or_loads_executable_state() -> None:
    sources = sorted(SRC.rglob("*.py"))
    assert len(sources) > 10
    for path in sources:
        text = path.read_text()
        tree = ast.parse(text, str(path))
        banned = set(_imports(tree)) & BANNED_MODULES
        assert not banned, f"{path} imports {banned}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                assert func not in ("eval", "exec", "torch.load", "__import__"), f"{path}: {func}()"
                for keyword in node.keywords:
                    assert keyword.arg != "allow_pickle", f"{path}: {func}(allow_pickle=...)"

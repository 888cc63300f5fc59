"""Fixtures of the store's tests: one store URL per backend (a local directory, or a prefix of
a bucket on the S3 test server reached through s3fs), and raw access to its files, so a test
can damage them or check that nothing was ever rewritten."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infobatch_stream.storage import ScoreStore

from .helpers import S3_ENV_KEYS


class Backend:
    """A store URL on one backend, and the raw files under it (paths relative to the root)."""

    def __init__(self, name: str, url: str, storage_options: dict | None, tmp_path: Path,
                 fs: Any, root: str, env: dict[str, str]):
        self.name = name
        self.url = url
        self.storage_options = storage_options
        self.fs = fs  # a filesystem of its own, so the store's listing caches play no part
        self.root = root
        self.env = env
        self._tmp = tmp_path

    def new_cache_dir(self) -> str:
        """A cache directory nobody used yet: a store opened on it downloads afresh."""
        path = self._tmp / f"cache-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return str(path)

    def open(self, cache_dir: str | None = None, **kwargs: Any) -> ScoreStore:
        """A new ScoreStore object on this URL, with a fresh cache unless one is given."""
        return ScoreStore(self.url, storage_options=self.storage_options,
                          cache_dir=cache_dir or self.new_cache_dir(), **kwargs)

    def sibling(self, name: str) -> Backend:
        """Another URL on the same backend (next to this one)."""
        root = f"{self.root.rsplit('/', 1)[0]}/{name}"
        url = root if self.name == "local" else f"s3://{root}"
        return Backend(self.name, url, self.storage_options, self._tmp, self.fs, root, self.env)

    def path(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    def files(self) -> dict[str, tuple]:
        """relpath -> identity of every file under the root (temporary files included).

        Locally the identity is (inode, mtime_ns, size): a file replaced by a rename or
        rewritten in place changes it. On S3 it is (ETag, LastModified, size).
        """
        out = {}
        if self.name == "local":
            for directory, _, names in os.walk(self.root):
                for name in names:
                    full = os.path.join(directory, name)
                    st = os.stat(full)
                    out[os.path.relpath(full, self.root)] = (st.st_ino, st.st_mtime_ns, st.st_size)
            return out
        self.fs.invalidate_cache()
        for path, info in self.fs.find(self.root, detail=True).items():
            out[path[len(self.root) + 1:]] = (info.get("ETag"), info.get("LastModified"),
                                               info["size"])
        return out

    def visible(self) -> set[str]:
        """Files a reader could ever look at: everything but temporary (``.tmp-``) names."""
        return {p for p in self.files() if not any(part.startswith(".tmp-") for part in p.split("/"))}

    def read(self, relpath: str) -> bytes:
        self.fs.invalidate_cache()
        return self.fs.cat_file(self.path(relpath))

    def write(self, relpath: str, data: bytes) -> None:
        """Replace a file's bytes behind the store's back (to damage it)."""
        if self.name == "local":
            os.makedirs(os.path.dirname(self.path(relpath)), exist_ok=True)
            Path(self.path(relpath)).write_bytes(data)
        else:
            self.fs.pipe_file(self.path(relpath), data)
        self.fs.invalidate_cache()

    def remove(self, relpath: str) -> None:
        self.fs.rm_file(self.path(relpath))
        self.fs.invalidate_cache()


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Iterator[Backend]:
    """A fresh, empty store URL: a local directory, then a prefix of a new bucket on S3."""
    if request.param == "local":
        import fsspec

        root = str(tmp_path / "store")
        yield Backend("local", root, None, tmp_path, fsspec.filesystem("file"), root, {})
        return
    server = request.getfixturevalue("s3_server")
    fs = request.getfixturevalue("s3_fs")
    bucket = f"store-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    root = f"{bucket}/runs/{uuid.uuid4().hex[:8]}/scores"
    env = {k: v for k, v in server.env.items() if k in S3_ENV_KEYS}
    yield Backend("s3", f"s3://{root}", server.storage_options, tmp_path, fs, root, env)


@pytest.fixture(scope="session")
def s3_fs(s3_server) -> Any:
    """One s3fs filesystem for the tests' own raw access (a new one costs a second)."""
    return s3_server.filesystem()


@pytest.fixture
def local_backend(tmp_path) -> Backend:
    import fsspec

    root = str(tmp_path / "store")
    return Backend("local", root, None, tmp_path, fsspec.filesystem("file"), root, {})

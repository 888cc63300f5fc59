"""Shared fixtures. S3 is a real S3-compatible HTTP server (moto's ThreadedMotoServer) on
127.0.0.1, reached through s3fs exactly as user code reaches AWS: nothing is mocked in-process."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint_url: str
    port: int
    server: object

    @property
    def storage_options(self) -> dict:
        """What a user passes as ``storage_options`` to reach this server."""
        return {"endpoint_url": self.endpoint_url, "key": S3_ENV["AWS_ACCESS_KEY_ID"],
                "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]}

    @property
    def env(self) -> dict:
        """Environment for a subprocess that reaches the server through the AWS variables."""
        return dict(S3_ENV, AWS_ENDPOINT_URL=self.endpoint_url)

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        yield S3Server(f"http://127.0.0.1:{port}", port, server)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket on the S3 test server; returns its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.filesystem().mkdir(name)
    return name


@pytest.fixture
def cache_dir(tmp_path) -> str:
    """A private snapshot cache directory, so tests never share the user's ~/.cache."""
    path = tmp_path / "cache"
    path.mkdir()
    return str(path)

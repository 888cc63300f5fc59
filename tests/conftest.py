"""Shared fixtures. S3 is a real S3-compatible HTTP server (moto's ThreadedMotoServer) on
127.0.0.1, reached through s3fs exactly as user code reaches AWS: nothing is mocked in-process."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

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


class RestartableS3Server(S3Server):
    """An S3 test server of one test's own, which the test may stop and start again.

    A restart is a new moto server on the same port. moto keeps its buckets in this process
    (its backends), not in the server, so the data survives, as an S3 outage or a MinIO
    restart would leave it; clients see refused connections while it is down.
    """

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.server = make_server("127.0.0.1", self.port, app, True,
                                          request_handler=MotoRequestHandler)
                break
            except (OSError, SystemExit):  # werkzeug exits when the port is taken
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # a client's connection may hold the port for a moment
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()  # else the kernel would accept connections nobody answers

    def down_for(self, seconds: float) -> threading.Thread:
        """Stop now, start again after ``seconds`` (in a thread; join it to wait)."""
        self.stop()
        thread = threading.Timer(seconds, self.start)
        thread.start()
        return thread


@pytest.fixture
def restartable_s3(s3_server: S3Server) -> Iterator[RestartableS3Server]:
    """A second S3 server (same data as ``s3_server``) that the test may stop and restart."""
    port = free_port()
    server = RestartableS3Server(f"http://127.0.0.1:{port}", port, None)
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        except Exception:  # already stopped by the test
            pass


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

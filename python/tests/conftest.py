"""A real local cluster for the client's tests: `tessera cluster up` as a child process (mutual TLS
with a throw-away CA), stopped with SIGTERM and reaped after the session, even when a test fails."""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


def tessera_binary() -> Path:
    """`TESSERA_BINARY`, else the release build in the repository (`swift build -c release`)."""
    binary = Path(os.environ.get("TESSERA_BINARY", REPOSITORY / ".build" / "release" / "tessera"))
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no tessera binary at {binary}: run `swift build -c release` or set TESSERA_BINARY")
    return binary


@pytest.fixture(scope="session")
def tessera():
    """The tessera binary the tests run."""
    return tessera_binary()


@contextlib.contextmanager
def local_cluster(workers: int):
    """The READY line's fields: `coordinator` (HOST:PORT), `certs` (the CA folder, with a client
    certificate `client` of tenant `default`) and `workers` (each with `id`, `address` and `pid`)."""
    process = subprocess.Popen(
        [str(tessera_binary()), "cluster", "up", "--workers", str(workers), "--log-level", "error"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while ready is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("READY "):
                ready = json.loads(line[len("READY ") :])
        if ready is None:
            pytest.fail(f"tessera cluster up did not print READY within 60 s (exit code {process.poll()})")
        yield ready
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def cluster():
    """Two workers, shared by the tests that leave it as they found it."""
    with local_cluster(2) as ready:
        yield ready


@pytest.fixture
def own_cluster():
    """Three workers for one test that kills some."""
    with local_cluster(3) as ready:
        yield ready

"""A real local cluster for the client's tests: `tessera cluster up` as a child process (mutual TLS
with a throw-away CA), stopped with SIGTERM and reaped after the session, even when a test fails."""

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
def cluster():
    """The READY line's fields: `coordinator` (HOST:PORT), `certs` (the CA folder, with a client
    certificate `client` of tenant `default`) and `workers`."""
    process = subprocess.Popen(
        [str(tessera_binary()), "cluster", "up", "--workers", "2", "--log-level", "error"],
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

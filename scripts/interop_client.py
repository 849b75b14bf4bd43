#!/usr/bin/env python3
"""Interop check: talk to a Tessera worker with Python's `protobuf` package instead of SwiftProtobuf.

Usage: interop_client.py HOST:PORT [CERT_DIR CERT_NAME]

Generates Python code from Protos/ with `protoc` into a temporary directory, then on one TCP
connection (frames: a 4-byte big-endian length, then one serialized tessera.v1.Envelope), over
mutual TLS with Python's `ssl` (OpenSSL) when given a certificate folder (CERT_DIR/ca.pem as the only
root, CERT_DIR/CERT_NAME.pem and CERT_NAME-key.pem as the client's, whose node id is CERT_NAME):
  1. Hello (request_id 0)                      -> expects hello_ack
  2. StatusRequest (request_id 1)              -> expects status_reply
  3. Decode of unknown sequence 424242 (id 3)  -> expects error ERROR_CODE_UNKNOWN_SEQUENCE
On success prints one JSON line and exits 0; otherwise prints an error to stderr and exits 1.

Needs Python 3.11+, `protoc` on PATH and the `protobuf` package (.ci/run pins the version).
"""

import importlib
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile

SOCKET_TIMEOUT_SECONDS = 10.0
MAX_FRAME_BYTES = 64 << 20
UNKNOWN_SEQUENCE_ID = 424242


class InteropError(Exception):
    pass


def fail(message: str) -> None:
    print(f"interop_client: {message}", file=sys.stderr)
    sys.exit(1)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate_python_code(out_dir: str) -> None:
    """Runs protoc on every .proto file under Protos/tessera/v1 into out_dir."""
    protos_dir = os.path.join(repo_root(), "Protos")
    proto_files = sorted(
        os.path.join(protos_dir, "tessera", "v1", name)
        for name in os.listdir(os.path.join(protos_dir, "tessera", "v1"))
        if name.endswith(".proto")
    )
    if not proto_files:
        raise InteropError(f"no .proto files in {protos_dir}/tessera/v1")
    command = ["protoc", f"--python_out={out_dir}", "-I", protos_dir, *proto_files]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise InteropError("protoc is not on PATH (install protobuf-compiler)")
    if result.returncode != 0:
        raise InteropError(f"protoc failed ({result.returncode}): {result.stderr.strip()}")


def import_generated(out_dir: str):
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        raise InteropError(
            "the Python 'protobuf' package is not installed (python3 -m pip install protobuf; .ci/run pins the version)"
        )
    sys.path.insert(0, out_dir)
    modules = {}
    for name in ("envelope", "handshake", "cluster", "data", "errors"):
        modules[name] = importlib.import_module(f"tessera.v1.{name}_pb2")
    return modules


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    """Reads exactly `count` bytes, however the kernel splits them; fails on EOF."""
    chunks = []
    remaining = count
    while remaining > 0:
        chunk = sock.recv(min(remaining, 1 << 16))
        if not chunk:
            got = count - remaining
            raise InteropError(f"connection closed after {got} of {count} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def send_envelope(sock: socket.socket, envelope) -> None:
    payload = envelope.SerializeToString(deterministic=True)
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def read_envelope(sock: socket.socket, envelope_type):
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    if length == 0 or length > MAX_FRAME_BYTES:
        raise InteropError(f"bad frame length {length}")
    payload = recv_exactly(sock, length)
    envelope = envelope_type()
    try:
        envelope.ParseFromString(payload)
    except Exception as error:  # google.protobuf.message.DecodeError
        raise InteropError(f"cannot parse a {length}-byte frame as tessera.v1.Envelope: {error}")
    return envelope


def read_reply(sock: socket.socket, envelope_type, request_id: int):
    """Reads frames until one carries `request_id` (others, e.g. unsolicited ones, are skipped)."""
    while True:
        envelope = read_envelope(sock, envelope_type)
        if envelope.request_id == request_id:
            return envelope


def describe(envelope) -> str:
    body = envelope.WhichOneof("body")
    if body == "error":
        code = envelope.error.code
        try:
            code = envelope.error.DESCRIPTOR.fields_by_name["code"].enum_type.values_by_number[code].name
        except KeyError:
            pass
        return f"error {code}: {envelope.error.message!r}"
    return f"{body!r}"


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InteropError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def connect(host: str, port: int, certs: tuple[str, str] | None):
    sock = socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_SECONDS)
    if certs is None:
        return sock
    folder, name = certs
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # peers are named by their certificates' subjects, not host names
    context.load_verify_locations(os.path.join(folder, "ca.pem"))
    context.load_cert_chain(os.path.join(folder, f"{name}.pem"), os.path.join(folder, f"{name}-key.pem"))
    return context.wrap_socket(sock)


def run(address: str, certs: tuple[str, str] | None) -> dict:
    host, port = parse_address(address)
    with tempfile.TemporaryDirectory(prefix="tessera-interop-") as out_dir:
        generate_python_code(out_dir)
        pb = import_generated(out_dir)
        envelope_pb2, handshake_pb2 = pb["envelope"], pb["handshake"]
        cluster_pb2, data_pb2, errors_pb2 = pb["cluster"], pb["data"], pb["errors"]
        Envelope = envelope_pb2.Envelope

        with connect(host, port, certs) as sock:
            sock.settimeout(SOCKET_TIMEOUT_SECONDS)

            hello = Envelope(
                request_id=0,
                hello=handshake_pb2.Hello(
                    protocol_version=1,
                    role=handshake_pb2.NODE_ROLE_CLIENT,
                    node_id=certs[1] if certs else "python-interop",
                    incarnation=1,
                ),
            )
            send_envelope(sock, hello)
            ack = read_envelope(sock, Envelope)
            if ack.WhichOneof("body") != "hello_ack":
                raise InteropError(f"expected hello_ack, got {describe(ack)}")

            send_envelope(sock, Envelope(request_id=1, status_request=cluster_pb2.StatusRequest()))
            reply = read_reply(sock, Envelope, 1)
            if reply.WhichOneof("body") != "status_reply":
                raise InteropError(f"expected status_reply for request 1, got {describe(reply)}")
            status = reply.status_reply

            decode = Envelope(
                request_id=3,
                decode=data_pb2.Decode(tenant="python", sequence_id=UNKNOWN_SEQUENCE_ID),
            )
            send_envelope(sock, decode)
            refused = read_reply(sock, Envelope, 3)
            if refused.WhichOneof("body") != "error":
                raise InteropError(f"expected error for request 3, got {describe(refused)}")
            if refused.error.code != errors_pb2.ERROR_CODE_UNKNOWN_SEQUENCE:
                raise InteropError(
                    f"expected ERROR_CODE_UNKNOWN_SEQUENCE for request 3, got {describe(refused)}"
                )

        return {
            "ok": True,
            "workers": [{"node_id": w.endpoint.node_id, "kv_bytes": w.kv_bytes} for w in status.workers],
            "sequence_count": status.sequence_count,
            "unknown_sequence_error": refused.error.message,
        }


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4):
        print("usage: interop_client.py HOST:PORT [CERT_DIR CERT_NAME]", file=sys.stderr)
        return 2
    try:
        result = run(argv[1], (argv[2], argv[3]) if len(argv) == 4 else None)
    except InteropError as error:
        fail(str(error))
    except socket.timeout:
        fail(f"timed out after {SOCKET_TIMEOUT_SECONDS:.0f} s talking to {argv[1]}")
    except OSError as error:
        fail(f"cannot talk to {argv[1]}: {error}")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

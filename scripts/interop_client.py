#!/usr/bin/env python3
"""Interop check: the Python client package (python/, on Python's `protobuf` instead of SwiftProtobuf
and OpenSSL instead of BoringSSL) talks to one Tessera worker directly.

Usage: interop_client.py HOST:PORT [CERT_DIR CERT_NAME]

On one connection (over mutual TLS as certificate CERT_NAME of CERT_DIR when given):
  1. Hello                                -> expects hello_ack
  2. StatusRequest                        -> expects status_reply
  3. Decode of unknown sequence 424242    -> expects error UNKNOWN_SEQUENCE
On success prints one JSON line and exits 0; otherwise prints an error to stderr and exits 1.

Needs the `protobuf` and `numpy` packages (scripts/test.sh makes an environment with the pinned ones).
"""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from tessera.client import Connection, TesseraError, tls_context  # noqa: E402
from tessera.v1 import cluster_pb2, data_pb2  # noqa: E402

UNKNOWN_SEQUENCE_ID = 424242


async def run(address: str, certs) -> dict:
    context = tls_context(*certs) if certs else None
    connection = await Connection.open(address, certs[1] if certs else "python-interop", context)
    try:
        status = await connection.request(timeout=10, status_request=cluster_pb2.StatusRequest())
        try:
            await connection.request(
                timeout=10, decode=data_pb2.Decode(tenant="python", sequence_id=UNKNOWN_SEQUENCE_ID)
            )
        except TesseraError as error:
            refused = error
        else:
            raise RuntimeError(f"a decode of unknown sequence {UNKNOWN_SEQUENCE_ID} was answered")
        if refused.code_name != "UNKNOWN_SEQUENCE":
            raise RuntimeError(f"expected UNKNOWN_SEQUENCE for the decode, got {refused}")
    finally:
        await connection.close()
    return {
        "ok": True,
        "workers": [{"node_id": w.endpoint.node_id, "kv_bytes": w.kv_bytes} for w in status.workers],
        "sequence_count": status.sequence_count,
        "unknown_sequence_error": refused.message,
    }


def main(argv) -> int:
    if len(argv) not in (2, 4):
        print("usage: interop_client.py HOST:PORT [CERT_DIR CERT_NAME]", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run(argv[1], (argv[2], argv[3]) if len(argv) == 4 else None))
    except (TesseraError, RuntimeError, OSError, asyncio.TimeoutError) as error:
        print(f"interop_client: talking to {argv[1]}: {error!r}", file=sys.stderr)
        return 1
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

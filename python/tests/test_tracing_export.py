"""OpenTelemetry export from real processes: `tessera bench --local --otlp-endpoint URL` sends every
process's spans (the bench's, the coordinator's and each worker's) to an OTLP/HTTP collector, here a
stand-in that keeps what is posted to it."""

import contextlib
import http.server
import os
import subprocess
import threading


class _Collector(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (the name http.server calls)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.posts.append((self.path, self.headers.get("Content-Type"), body))
        # An empty ExportTraceServiceResponse: everything accepted.
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def collector():
    """A collector on a free port: yields (its URL, the posts it received)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.posts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.posts
    finally:
        server.shutdown()
        thread.join()


def test_every_process_of_a_bench_exports_its_spans(tessera, tmp_path):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    with collector() as (url, posts):
        subprocess.run(
            [
                str(tessera), "bench", "--local", "2", "--model", "tiny", "--workload", "image-qa",
                "--policy", "snapkv", "--sequences", "2", "--decode-tokens", "2", "--otlp-endpoint", url,
                "--json", str(tmp_path / "bench.json"),
            ],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=180,
            check=True,
        )
    assert posts, "no spans reached the collector"
    assert {path for path, _, _ in posts} == {"/v1/traces"}
    assert {kind for _, kind, _ in posts} == {"application/x-protobuf"}
    # OTLP protobuf carries names as plain UTF-8: each process's service name and the spans it made.
    sent = b"".join(body for _, _, body in posts)
    for service in [b"tessera-bench", b"tessera-coordinator", b"tessera-worker"]:
        assert service in sent, f"no spans from {service.decode()}"
    for span in [b"sequence", b"open_sequence", b"prefill", b"budget_cycle", b"assign_budget", b"decode", b"close"]:
        assert span in sent, f"no {span.decode()} span"

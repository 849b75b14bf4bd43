import ClusterAdmin
import Metrics
import NIOCore
import NIOPosix
import Prometheus
import Synchronization
import Testing

@Suite("AdminServer", .timeLimit(.minutes(1)))
struct AdminServerTests {
    @Test("GET /metrics exposes a counter incremented through swift-metrics")
    func metricsExposeIncrementedCounter() async throws {
        let registry = PrometheusCollectorRegistry()
        withMetricsFactory(MetricsBootstrap.makeFactory(registry: registry)) {
            Counter(
                label: TesseraMetrics.requestsTotal,
                dimensions: [(TesseraMetrics.Label.type, "prefill"), (TesseraMetrics.Label.outcome, "ok")]
            ).increment(by: 3)
        }

        let response = try await withAdminServer(registry: registry) { port in
            try await httpRequest(port: port, path: "/metrics")
        }

        #expect(response.status == 200)
        #expect(response.header("content-type") == "text/plain; version=0.0.4")
        #expect(response.body.contains("# TYPE tessera_requests_total counter"))
        #expect(response.body.contains(#"tessera_requests_total{type="prefill",outcome="ok"} 3"#))
    }

    @Test("/metrics reflects updates made while the server runs")
    func metricsAreLive() async throws {
        let registry = PrometheusCollectorRegistry()
        let counter = registry.makeCounter(
            descriptor: MetricNameDescriptor(metricName: "tessera_test_live", unitName: "total", helpText: "test")
        )
        try await withAdminServer(registry: registry) { port in
            counter.increment()
            let first = try await httpRequest(port: port, path: "/metrics")
            #expect(first.body.contains("tessera_test_live_total 1"))
            counter.increment(by: Int64(41))
            let second = try await httpRequest(port: port, path: "/metrics?format=text")
            #expect(second.status == 200)
            #expect(second.body.contains("tessera_test_live_total 42"))
        }
    }

    @Test("GET /healthz answers ok")
    func healthz() async throws {
        let response = try await withAdminServer { port in
            try await httpRequest(port: port, path: "/healthz")
        }
        #expect(response.status == 200)
        #expect(response.body == "ok")
        #expect(response.header("connection") == "close")
    }

    @Test("unknown paths are 404", arguments: ["/", "/metric", "/healthz/x", "/nope"])
    func unknownPath(path: String) async throws {
        let response = try await withAdminServer { port in
            try await httpRequest(port: port, path: path)
        }
        #expect(response.status == 404)
    }

    @Test(
        "methods other than GET are 405 with Allow: GET",
        arguments: [("POST", "/metrics"), ("PUT", "/healthz"), ("DELETE", "/nope"), ("HEAD", "/metrics")]
    )
    func methodNotAllowed(method: String, path: String) async throws {
        let response = try await withAdminServer { port in
            try await httpRequest(port: port, method: method, path: path, body: method == "POST" ? "hello" : "")
        }
        #expect(response.status == 405)
        #expect(response.header("allow") == "GET")
        if method == "HEAD" { #expect(response.body.isEmpty) }
    }

    @Test("keep-alive: pipelined requests on one connection are answered in order")
    func keepAliveAndPipelining() async throws {
        let raw = try await withAdminServer { port in
            try await rawHTTPExchange(
                port: port,
                request: "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                    + "POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                    + "GET /missing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
        }
        let responses = try HTTPTestResponse.parseAll(raw)
        #expect(
            responses.map(\.statusLine) == [
                "HTTP/1.1 200 OK", "HTTP/1.1 405 Method Not Allowed", "HTTP/1.1 404 Not Found",
            ]
        )
        #expect(responses.map(\.body) == ["ok", "method not allowed\n", "not found\n"])
        #expect(responses.map { $0.header("connection") } == [nil, nil, "close"])
    }

    @Test("an HTTP/1.0 request gets an HTTP/1.0 answer and the connection closes")
    func http10() async throws {
        let raw = try await withAdminServer { port in
            try await rawHTTPExchange(port: port, request: "GET /healthz HTTP/1.0\r\n\r\n")
        }
        let response = try HTTPTestResponse(parsing: raw)
        #expect(response.statusLine == "HTTP/1.0 200 OK")
        #expect(response.body == "ok")
    }

    @Test("a malformed request gets 400 and does not stop the server")
    func malformedRequestDoesNotStopServer() async throws {
        try await withAdminServer { port in
            let garbage = try await rawHTTPExchange(port: port, request: "\u{1}\u{2} nonsense\r\n\r\n")
            #expect(garbage.hasPrefix("HTTP/1.1 400"))
            let response = try await httpRequest(port: port, path: "/healthz")
            #expect(response.status == 200)
        }
    }

    @Test("concurrent clients are all served")
    func concurrentClients() async throws {
        try await withAdminServer { port in
            try await withThrowingTaskGroup(of: Int?.self) { group in
                for _ in 0..<16 {
                    group.addTask { try await httpRequest(port: port, path: "/healthz").status }
                }
                for try await status in group {
                    #expect(status == 200)
                }
            }
        }
    }

    @Test("cancelling run() closes the listener and the idle connections, and returns")
    func cancellationStopsServer() async throws {
        let (port, idle) = try await withDeadline(seconds: 20) {
            try await withAdminServer { port in
                // An idle keep-alive connection must not keep the server alive. One request on it first,
                // so that the server has accepted it before it is cancelled.
                let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .connect(host: "127.0.0.1", port: port) { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                        }
                    }
                let (served, signal) = AsyncStream.makeStream(of: Void.self)
                let idle = Task {
                    try await channel.executeThenClose { inbound, outbound in
                        try await outbound.write(ByteBuffer(string: "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
                        var received = ""
                        for try await chunk in inbound {
                            received += String(buffer: chunk)
                            if received.hasSuffix("ok") { signal.finish() }
                        }
                        return received  // the server closed the connection
                    }
                }
                for await _ in served {}
                return (port, idle)
            }
        }
        let received = try await withDeadline(seconds: 10) { try await idle.value }
        #expect(received.hasPrefix("HTTP/1.1 200 OK"))
        await #expect(throws: (any Error).self) {
            try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: "127.0.0.1", port: port)
                .get()
                .close()
        }
    }

    @Test("a setting is read with GET and changed with PUT; a refused value changes nothing")
    func settings() async throws {
        let value = Mutex("none")
        let setting = AdminSetting(
            read: { value.withLock { $0 } },
            write: { text in
                guard text.hasPrefix("drop=") || text == "none" else {
                    throw HTTPTestError(message: "'\(text)' is not a plan; allowed: none, drop=P")
                }
                value.withLock { $0 = text }
                return text
            }
        )
        let token = "0123456789abcdef0123"
        try await withAdminServer(settings: ["/faults": setting], token: try AdminToken(token)) { port in
            #expect(try await httpRequest(port: port, path: "/faults").body == "none\n")
            // Without the token, or with a wrong one, nothing changes.
            #expect(try await httpRequest(port: port, method: "PUT", path: "/faults", body: "drop=1").status == 401)
            let wrong = try await httpRequest(
                port: port,
                method: "PUT",
                path: "/faults",
                body: "drop=1",
                token: "0123456789abcdef0124"
            )
            #expect(wrong.status == 401)
            #expect(value.withLock { $0 } == "none")
            let changed = try await httpRequest(
                port: port,
                method: "PUT",
                path: "/faults",
                body: "drop=1\n",
                token: token
            )
            #expect(changed.status == 200)
            #expect(changed.body == "drop=1\n")
            let refused = try await httpRequest(port: port, method: "PUT", path: "/faults", body: "bogus", token: token)
            #expect(refused.status == 400)
            #expect(refused.body.contains("allowed: none, drop=P"))
            #expect(try await httpRequest(port: port, path: "/faults").body == "drop=1\n")
            let post = try await httpRequest(port: port, method: "POST", path: "/faults", body: "none")
            #expect(post.status == 405)
            #expect(post.header("allow") == "GET, PUT")
            let huge = try await httpRequest(
                port: port,
                method: "PUT",
                path: "/faults",
                body: String(repeating: "x", count: 64 * 1024 + 1),
                token: token
            )
            #expect(huge.status == 413)
            #expect(value.withLock { $0 } == "drop=1")
        }
        // A server without a token keeps its settings read-only.
        try await withAdminServer(settings: ["/faults": setting]) { port in
            let readOnly = try await httpRequest(port: port, method: "PUT", path: "/faults", body: "none", token: token)
            #expect(readOnly.status == 403)
            #expect(value.withLock { $0 } == "drop=1")
        }
    }

    @Test("binding a port in use throws bindFailed")
    func bindFailure() async throws {
        try await withAdminServer { port in
            let second = AdminServer(host: "127.0.0.1", port: port, registry: PrometheusCollectorRegistry())
            let error = await #expect(throws: ClusterAdminError.self) {
                try await second.run()
            }
            #expect(error?.code == .bindFailed)
            #expect(error?.message.contains("127.0.0.1:\(port)") == true)
        }
    }
}

import ClusterAdmin
import Foundation
import Metrics
import Prometheus
import Testing

@Suite("MetricsBootstrap")
struct MetricsBootstrapTests {
    @Test("every Tessera metric is prefixed, and can be created and exposed with its documented labels")
    func catalogMetricsAreExposed() {
        let registry = PrometheusCollectorRegistry()
        withMetricsFactory(MetricsBootstrap.makeFactory(registry: registry)) {
            for metric in TesseraMetrics.all {
                #expect(metric.name.hasPrefix("tessera_"))
                let dimensions = metric.labels.map { ($0, "x") }
                switch metric.kind {
                case .counter: Counter(label: metric.name, dimensions: dimensions).increment()
                case .gauge: Gauge(label: metric.name, dimensions: dimensions).record(7)
                case .timer: Metrics.Timer(label: metric.name, dimensions: dimensions).recordMilliseconds(3)
                }
            }
        }
        let exposition = registry.emitToString()
        #expect(exposition.contains(#"tessera_kv_bytes{node="x",modality="x"} 7"#))
        #expect(exposition.contains("tessera_live_sequences 7"))
        #expect(exposition.contains(#"tessera_requests_total{type="x",outcome="x"} 1"#))
        #expect(exposition.contains("# TYPE tessera_request_duration_seconds histogram"))
        // The Tessera buckets, not Prometheus' defaults (which start at 5 ms).
        #expect(exposition.contains(#"tessera_request_duration_seconds_bucket{type="x",le="0.0001"} 0"#))
        #expect(exposition.contains(#"tessera_request_duration_seconds_bucket{type="x",le="0.005"} 1"#))
        #expect(exposition.contains(#"tessera_request_duration_seconds_count{type="x"} 1"#))
        // Compute per shard runs to minutes: its own buckets, up to 5 min.
        #expect(exposition.contains(#"tessera_profile_duration_seconds_bucket{policy="x",le="300.0"} 1"#))
    }

    @Test("kept handles are made once per label set and count into the factory's registry")
    func keptHandles() {
        let registry = PrometheusCollectorRegistry()
        withMetricsFactory(MetricsBootstrap.makeFactory(registry: registry)) {
            let handles = MetricHandles()
            let ok = [("type", "prefill"), ("outcome", "ok")]
            #expect(
                handles.counter(TesseraMetrics.requestsTotal, dimensions: ok)
                    === handles.counter(TesseraMetrics.requestsTotal, dimensions: ok)
            )
            handles.counter(TesseraMetrics.requestsTotal, dimensions: ok).increment()
            handles.counter(TesseraMetrics.requestsTotal, dimensions: ok).increment()
            handles.counter(
                TesseraMetrics.requestsTotal,
                dimensions: [("type", "prefill"), ("outcome", "BAD_REQUEST")]
            )
            .increment()
            handles.timer(TesseraMetrics.requestDurationSeconds, dimensions: [("type", "prefill")]).recordMilliseconds(
                3
            )
            handles.timer(TesseraMetrics.requestDurationSeconds, dimensions: [("type", "decode_step")])
                .recordMilliseconds(3)
        }
        let exposition = registry.emitToString()
        #expect(exposition.contains(#"tessera_requests_total{type="prefill",outcome="ok"} 2"#))
        #expect(exposition.contains(#"tessera_requests_total{type="prefill",outcome="BAD_REQUEST"} 1"#))
        #expect(exposition.contains(#"tessera_request_duration_seconds_count{type="prefill"} 1"#))
        #expect(exposition.contains(#"tessera_request_duration_seconds_count{type="decode_step"} 1"#))
    }

    @Test("the metric names match the documented ones")
    func names() {
        #expect(
            TesseraMetrics.all.map(\.name) == [
                "tessera_kv_bytes", "tessera_live_sequences", "tessera_requests_total",
                "tessera_request_duration_seconds", "tessera_accounted_kv_bytes", "tessera_memory_limit_bytes",
                "tessera_tightenings_total", "tessera_admission_refusals_total", "tessera_workers",
                "tessera_member_transitions_total", "tessera_failovers_total", "tessera_lost_sequences_total",
                "tessera_rereplications_total", "tessera_rereplicated_bytes_total", "tessera_under_replicated_shards",
                "tessera_compression_input_bytes_total", "tessera_compression_output_bytes_total",
                "tessera_profile_duration_seconds", "tessera_compress_duration_seconds",
            ]
        )
        #expect(TesseraMetrics.computeDurationBuckets == TesseraMetrics.computeDurationBuckets.sorted())
        #expect(TesseraMetrics.requestDurationBuckets == TesseraMetrics.requestDurationBuckets.sorted())
    }

    /// Bootstrapping is process-global, so it runs in a child process (an exit test).
    @Test("bootstrap() bootstraps MetricsSystem once and always returns the same registry")
    func bootstrapOncePerProcess() async {
        await #expect(processExitsWith: .success) {
            let first = MetricsBootstrap.bootstrap()
            let second = MetricsBootstrap.bootstrap()
            precondition(first === second, "bootstrap() returned two registries")
            Counter(label: TesseraMetrics.requestsTotal, dimensions: [("type", "put"), ("outcome", "ok")])
                .increment(by: 2)
            let exposition = first.emitToString()
            precondition(
                exposition.contains(#"tessera_requests_total{type="put",outcome="ok"} 2"#),
                "global swift-metrics counter missing from the registry: \(exposition)"
            )
        }
    }
}

@Suite("ProcessMetrics")
struct ProcessMetricsTests {
    /// The value of the sample line that starts with `name ` in an exposition.
    static func value(_ name: String, in exposition: String) -> Double? {
        exposition.split(separator: "\n").first { $0.hasPrefix("\(name) ") }.flatMap {
            Double($0.split(separator: " ")[1])
        }
    }

    @Test("the process metrics read this process's figures, and CPU time only counts up")
    func processFigures() throws {
        #if os(Linux)
        let registry = PrometheusCollectorRegistry()
        let metrics = ProcessMetrics(registry: registry)
        metrics.update()
        let first = registry.emitToString()
        for name in ProcessMetrics.names { #expect(Self.value(name, in: first) != nil, "\(name) missing") }
        #expect(first.contains("# TYPE process_cpu_seconds_total counter"))
        let resident = try #require(Self.value("process_resident_memory_bytes", in: first))
        #expect(resident > 1_000_000)
        #expect(try #require(Self.value("process_open_fds", in: first)) >= 3)
        let started = try #require(Self.value("process_start_time_seconds", in: first))
        let now = Date().timeIntervalSince1970
        #expect(started <= now + 1 && started > now - 7 * 86_400, "start \(started), now \(now)")

        // Burn some CPU: the counter moves up by about that much, never down.
        let before = try #require(Self.value("process_cpu_seconds_total", in: first))
        var sum = 0.0
        for i in 0..<20_000_000 { sum += Double(i & 7) }
        #expect(sum > 0)
        metrics.update()
        let after = try #require(Self.value("process_cpu_seconds_total", in: registry.emitToString()))
        #expect(after > before)
        #endif
    }
}

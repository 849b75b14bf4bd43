import ClusterAdmin
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
    }

    @Test("the metric names match the documented ones")
    func names() {
        #expect(
            TesseraMetrics.all.map(\.name) == [
                "tessera_kv_bytes", "tessera_live_sequences", "tessera_requests_total",
                "tessera_request_duration_seconds",
            ]
        )
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

import Metrics
public import Prometheus

/// Connects swift-metrics to Prometheus.
///
/// Only the `tessera` executable calls ``bootstrap()``; libraries emit through swift-metrics and tests bind
/// ``makeFactory(registry:)`` with `withMetricsFactory` instead of touching the global system.
public enum MetricsBootstrap {
    /// The process-wide registry; creating it bootstraps `MetricsSystem` exactly once (a `static let` is
    /// initialised lazily and atomically).
    private static let processRegistry: PrometheusCollectorRegistry = {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(makeFactory(registry: registry))
        return registry
    }()

    /// Creates the process's `PrometheusCollectorRegistry`, bootstraps `MetricsSystem` with a
    /// `PrometheusMetricsFactory` writing into it, and returns it.
    ///
    /// Safe to call more than once: later calls return the same registry. It still traps (as
    /// `MetricsSystem.bootstrap` does) if something else bootstrapped `MetricsSystem` first.
    @discardableResult
    public static func bootstrap() -> PrometheusCollectorRegistry {
        processRegistry
    }

    /// A `PrometheusMetricsFactory` for `registry` with Tessera's histogram buckets, without bootstrapping
    /// anything; for tests (`withMetricsFactory`) and for callers that manage `MetricsSystem` themselves.
    public static func makeFactory(registry: PrometheusCollectorRegistry) -> PrometheusMetricsFactory {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets[TesseraMetrics.requestDurationSeconds] = TesseraMetrics.requestDurationBuckets
        for name in [TesseraMetrics.profileDurationSeconds, TesseraMetrics.compressDurationSeconds] {
            factory.durationHistogramBuckets[name] = TesseraMetrics.computeDurationBuckets
        }
        return factory
    }
}

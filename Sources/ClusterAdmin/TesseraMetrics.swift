/// The names and labels of the metrics Tessera's services emit, all prefixed `tessera_`.
///
/// Services create them through swift-metrics so tests can swap the factory with `withMetricsFactory`:
///
/// ```swift
/// Gauge(label: TesseraMetrics.kvBytes,
///       dimensions: [(TesseraMetrics.Label.node, nodeID), (TesseraMetrics.Label.modality, "image")])
///     .record(bytes)
/// Counter(label: TesseraMetrics.requestsTotal,
///         dimensions: [(TesseraMetrics.Label.type, "prefill"), (TesseraMetrics.Label.outcome, "ok")])
///     .increment()
/// Timer(label: TesseraMetrics.requestDurationSeconds, dimensions: [(TesseraMetrics.Label.type, "prefill")])
///     .recordNanoseconds(elapsed)
/// ```
///
/// Prometheus requires one label set per metric name: always pass exactly the labels listed here, in this
/// order, or the registry traps.
public enum TesseraMetrics {
    /// Gauge: bytes of KV cache held. Labels: ``Label/node``, ``Label/modality``.
    public static let kvBytes = "tessera_kv_bytes"
    /// Gauge: sequences currently resident in the cluster. No labels.
    public static let liveSequences = "tessera_live_sequences"
    /// Counter: requests handled. Labels: ``Label/type``, ``Label/outcome``.
    public static let requestsTotal = "tessera_requests_total"
    /// Timer (a Prometheus histogram in seconds, buckets ``requestDurationBuckets``). Label: ``Label/type``.
    public static let requestDurationSeconds = "tessera_request_duration_seconds"

    /// Label keys.
    public enum Label {
        /// The node ID, e.g. `worker-1` or `coordinator`.
        public static let node = "node"
        /// The modality of the cached tokens: `text`, `image` (and `video`, `audio` if a workload has them).
        public static let modality = "modality"
        /// The request type, e.g. `prefill`, `decode`, `evict`, `status`.
        public static let type = "type"
        /// The outcome: `ok`, `rejected`, `error` or `timeout`.
        public static let outcome = "outcome"
    }

    /// The kind of a metric as swift-metrics creates it.
    public enum Kind: String, Sendable, Hashable {
        case counter
        case gauge
        case timer
    }

    /// A metric's name, kind and label keys.
    public struct Descriptor: Sendable, Hashable {
        public var name: String
        public var kind: Kind
        public var labels: [String]
    }

    /// Every Tessera metric.
    public static let all: [Descriptor] = [
        Descriptor(name: kvBytes, kind: .gauge, labels: [Label.node, Label.modality]),
        Descriptor(name: liveSequences, kind: .gauge, labels: []),
        Descriptor(name: requestsTotal, kind: .counter, labels: [Label.type, Label.outcome]),
        Descriptor(name: requestDurationSeconds, kind: .timer, labels: [Label.type]),
    ]

    /// Histogram buckets for ``requestDurationSeconds``: 100 µs to 10 s.
    public static let requestDurationBuckets: [Duration] = [
        .microseconds(100), .microseconds(250), .microseconds(500),
        .milliseconds(1), .microseconds(2500), .milliseconds(5),
        .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .milliseconds(500),
        .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
    ]
}

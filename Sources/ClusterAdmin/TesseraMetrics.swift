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

    /// Gauge (coordinator): bytes the memory limit charges, by tenant and compression policy (a
    /// sequence's full size until every copy applied its budget, then what its copies hold, and its
    /// decode rows to come). Labels: ``Label/tenant``, ``Label/policy``.
    public static let accountedKVBytes = "tessera_accounted_kv_bytes"
    /// Gauge (coordinator): the memory limit on accounted bytes; 0 when there is none. No labels.
    public static let memoryLimitBytes = "tessera_memory_limit_bytes"
    /// Counter (coordinator): compressed sequences whose retention was halved to make room for a new
    /// one. No labels.
    public static let tighteningsTotal = "tessera_tightenings_total"
    /// Counter (coordinator): opens refused for memory after tightening. Label: ``Label/reason``
    /// (`memory`: the cluster's limit; `quota`: the tenant's).
    public static let admissionRefusalsTotal = "tessera_admission_refusals_total"
    /// Gauge (coordinator): workers by failure-detector state. Label: ``Label/state`` (`alive`,
    /// `suspect`, `dead`).
    public static let workers = "tessera_workers"
    /// Counter (coordinator): failure-detector transitions, by the state entered. Label: ``Label/state``.
    public static let memberTransitionsTotal = "tessera_member_transitions_total"
    /// Counter (coordinator): sequences moved to a new epoch because a holder died. No labels.
    public static let failoversTotal = "tessera_failovers_total"
    /// Counter (coordinator): sequences closed because a shard lost every copy. No labels.
    public static let lostSequencesTotal = "tessera_lost_sequences_total"
    /// Counter (coordinator): shard copies made to restore replication. Label: ``Label/outcome``
    /// (`ok`; `error`, retried; `superseded`, the sequence moved on during the copy).
    public static let reReplicationsTotal = "tessera_rereplications_total"
    /// Counter (coordinator): bytes of tensor data and row arrays the completed shard copies moved.
    /// No labels.
    public static let reReplicatedBytesTotal = "tessera_rereplicated_bytes_total"
    /// Gauge (coordinator): shards of compressed sequences with fewer copies than the replication
    /// factor. No labels.
    public static let underReplicatedShards = "tessera_under_replicated_shards"
    /// Counter (worker): bytes the compressed shards held before their first budget (Float32 prompt
    /// K/V). Label: ``Label/policy``.
    public static let compressionInputBytesTotal = "tessera_compression_input_bytes_total"
    /// Counter (worker): bytes the same shards held after it. Label: ``Label/policy``.
    public static let compressionOutputBytesTotal = "tessera_compression_output_bytes_total"
    /// Timer (worker; buckets ``computeDurationBuckets``): a shard's attention profiles at prefill.
    /// Label: ``Label/policy``.
    public static let profileDurationSeconds = "tessera_profile_duration_seconds"
    /// Timer (worker; buckets ``computeDurationBuckets``): compressing a shard to its first budget.
    /// Label: ``Label/policy``.
    public static let compressDurationSeconds = "tessera_compress_duration_seconds"

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
        /// The tenant a client certificate names.
        public static let tenant = "tenant"
        /// A compression policy's wire name, e.g. `vl-cache`.
        public static let policy = "policy"
        /// Why, e.g. `memory` or `quota`.
        public static let reason = "reason"
        /// A failure-detector state: `alive`, `suspect` or `dead`.
        public static let state = "state"
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
        Descriptor(name: accountedKVBytes, kind: .gauge, labels: [Label.tenant, Label.policy]),
        Descriptor(name: memoryLimitBytes, kind: .gauge, labels: []),
        Descriptor(name: tighteningsTotal, kind: .counter, labels: []),
        Descriptor(name: admissionRefusalsTotal, kind: .counter, labels: [Label.reason]),
        Descriptor(name: workers, kind: .gauge, labels: [Label.state]),
        Descriptor(name: memberTransitionsTotal, kind: .counter, labels: [Label.state]),
        Descriptor(name: failoversTotal, kind: .counter, labels: []),
        Descriptor(name: lostSequencesTotal, kind: .counter, labels: []),
        Descriptor(name: reReplicationsTotal, kind: .counter, labels: [Label.outcome]),
        Descriptor(name: reReplicatedBytesTotal, kind: .counter, labels: []),
        Descriptor(name: underReplicatedShards, kind: .gauge, labels: []),
        Descriptor(name: compressionInputBytesTotal, kind: .counter, labels: [Label.policy]),
        Descriptor(name: compressionOutputBytesTotal, kind: .counter, labels: [Label.policy]),
        Descriptor(name: profileDurationSeconds, kind: .timer, labels: [Label.policy]),
        Descriptor(name: compressDurationSeconds, kind: .timer, labels: [Label.policy]),
    ]

    /// Histogram buckets for the workers' compute per shard (``profileDurationSeconds``,
    /// ``compressDurationSeconds``): 1 ms to 5 min, since a long multimodal prompt's full attention
    /// profile takes minutes on a small machine.
    public static let computeDurationBuckets: [Duration] = [
        .milliseconds(1), .milliseconds(5), .milliseconds(25), .milliseconds(100),
        .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500),
        .seconds(5), .seconds(10), .seconds(30), .seconds(60), .seconds(300),
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

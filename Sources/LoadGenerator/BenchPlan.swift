public import KVCacheCore
public import Workloads

/// What `tessera bench` runs: a workload, the policies to compare over the same seeded traffic, how
/// traffic arrives and when a policy's run ends.
public struct BenchPlan: Sendable {
    /// How sequences arrive.
    public enum Loop: Sendable, Hashable {
        /// A fixed number of sequences in flight; each starts when another ends.
        case closed(concurrency: Int)
        /// Poisson arrivals at `ratePerSecond`, whatever the cluster's pace; at most `maxInFlight` run
        /// at once and later arrivals wait, their latency counted from when they were due.
        case open(ratePerSecond: Double, maxInFlight: Int)
    }

    /// When a policy's run stops starting sequences (those in flight finish).
    public enum Stop: Sendable, Hashable {
        case after(Duration)
        case sequences(Int)
    }

    public struct Policy: Sendable {
        public var name: String
        public var policy: CompressionPolicy
        /// Retention of the prompt cache (1 for the full cache).
        public var retention: Double

        public init(name: String, policy: CompressionPolicy, retention: Double) {
            self.name = name
            self.policy = policy
            self.retention = retention
        }
    }

    /// Shown in reports: the preset or file name.
    public var workloadName: String
    public var workload: WorkloadFile
    public var policies: [Policy]
    public var loop: Loop
    public var stop: Stop
    public var seed: UInt64
    /// The fraction of sequences audited (the same sequences under every policy).
    public var auditFraction: Double
    /// How often the cluster's footprint is sampled.
    public var sampleInterval: Duration
    /// Trace files replayed instead of the workload's generated sequences: sequence `i` is file
    /// `i mod count`, prefilled with its tensors inline and decoded with its steps. Empty: generated.
    public var traces: [TraceFile]

    public init(
        workloadName: String,
        workload: WorkloadFile,
        policies: [Policy],
        loop: Loop,
        stop: Stop,
        seed: UInt64,
        auditFraction: Double = 0.25,
        sampleInterval: Duration = .milliseconds(250),
        traces: [TraceFile] = []
    ) {
        self.workloadName = workloadName
        self.workload = workload
        self.policies = policies
        self.loop = loop
        self.stop = stop
        self.seed = seed
        self.auditFraction = auditFraction
        self.sampleInterval = sampleInterval
        self.traces = traces
    }

    /// The model the report names: the traces' (the first file's), else the workload's.
    public var geometry: ModelGeometry { traces.first?.geometry ?? workload.geometry }

    /// Whether sequence `index` is audited: evenly spaced, starting with the first (0, 4, 8, … at
    /// 0.25), so that every policy audits the same sequences and a short run audits at least one.
    public func isAudited(_ index: Int) -> Bool {
        guard auditFraction > 0 else { return false }
        return (Double(index) * auditFraction).rounded(.up) != (Double(index + 1) * auditFraction).rounded(.up)
    }
}

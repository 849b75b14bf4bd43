public import KVCacheCore

/// What one `tessera bench` run measured: one result per policy, run over the same seeded traffic.
/// Encoded as the `--json` file.
public struct BenchReport: Sendable, Codable, Hashable {
    /// The workload preset or file name.
    public var workload: String
    /// The model geometry's name.
    public var model: String
    /// Worker processes in the cluster.
    public var workers: Int
    public var seed: UInt64
    /// "closed" (fixed concurrency) or "open" (Poisson arrivals).
    public var loop: String
    /// Concurrency of a closed loop, or arrivals per second of an open one.
    public var load: Double
    public var policies: [PolicyResult]

    public init(
        workload: String,
        model: String,
        workers: Int,
        seed: UInt64,
        loop: String,
        load: Double,
        policies: [PolicyResult]
    ) {
        self.workload = workload
        self.model = model
        self.workers = workers
        self.seed = seed
        self.loop = loop
        self.load = load
        self.policies = policies
    }
}

/// One policy's run.
public struct PolicyResult: Sendable, Codable, Hashable {
    public var policy: String
    /// Retention ratio of the prompt cache (1 for the full cache).
    public var budget: Double
    /// Sequences completed (opened, prefilled, decoded, closed).
    public var sequences: Int
    /// Decode tokens completed over every sequence.
    public var decodeTokens: Int
    public var durationSeconds: Double
    public var tokensPerSecond: Double
    /// Decode-step latency at the client (one step = every shard of the sequence answered), steps
    /// after the first, of sequences not audited.
    public var decodeP50Micros: UInt64
    public var decodeP99Micros: UInt64
    public var decodeMaxMicros: UInt64
    /// Time to first token: open, prefill, the budget's gather-allocate-compress, and the first
    /// decode step (which waits for the budget); measured from when the sequence was due.
    public var prefillP50Micros: UInt64
    public var prefillP99Micros: UInt64
    /// Peak and mean over the samples of the cluster's accounted K/V bytes.
    public var peakKVBytes: UInt64
    public var meanKVBytes: UInt64
    /// What the completed sequences would hold uncompressed at their last step (prompt and decoded rows).
    public var fullKVBytes: UInt64
    /// What they held compressed at their last step.
    public var compressedKVBytes: UInt64
    /// 1 − compressed / full: the fraction of K/V memory saved.
    public var saving: Double
    /// Mean relative L2 error of decode-attention outputs against the full cache, over audited sequences.
    public var outputError: Double?
    /// Fraction of needle probes answered correctly, over audited sequences.
    public var needleAccuracy: Double?
    public var auditedSequences: Int
    /// Sequences that failed (a refused open that never fit counts too).
    public var errors: Int
    /// The first few distinct error messages, to tell what failed.
    public var errorMessages: [String]
    /// Opens refused with RESOURCE_EXHAUSTED (each is retried after the hint).
    public var refusals: Int
    /// Requests retried after a refusal or a placement change.
    public var retries: Int
    public var workers: [WorkerPeak]
    /// The decode-latency distribution: (percentile, micros) points for charts.
    public var decodeLatencyPercentiles: [LatencyPoint]
    /// Decode throughput of one sequence: timed decode steps ÷ the seconds they took, summed over
    /// sequences (what a sequence decodes per second while it decodes, queueing between steps aside).
    public var decodeThroughput: Double
    /// Per completed sequence, the workers' compute before its first step (primaries, summed over
    /// shards): expanding the synthetic prompt, the attention profiles, compressing to the budget.
    public var synthesisMillis: Double
    public var profileMillis: Double
    public var compressMillis: Double
    /// Per completed sequence, K/V bytes × seconds from its open to its close: its full size until
    /// its first decode step returned (it sits uncompressed until then), then what each step reported.
    public var kvByteSeconds: Double
    /// The smallest and the largest share of the prompt's rows one KV head keeps (as `eval` reports
    /// them: the spread over every layer and head of a sequence, mean over the completed sequences),
    /// from the workers' reports at each sequence's last step; nil when no sequence reported them.
    public var headShareMin: Double?
    public var headShareMax: Double?

    public init(
        policy: String,
        budget: Double,
        sequences: Int,
        decodeTokens: Int,
        durationSeconds: Double,
        tokensPerSecond: Double,
        decodeP50Micros: UInt64,
        decodeP99Micros: UInt64,
        decodeMaxMicros: UInt64,
        prefillP50Micros: UInt64,
        prefillP99Micros: UInt64,
        peakKVBytes: UInt64,
        meanKVBytes: UInt64,
        fullKVBytes: UInt64,
        compressedKVBytes: UInt64,
        saving: Double,
        outputError: Double?,
        needleAccuracy: Double?,
        auditedSequences: Int,
        errors: Int,
        errorMessages: [String] = [],
        refusals: Int,
        retries: Int,
        workers: [WorkerPeak],
        decodeLatencyPercentiles: [LatencyPoint],
        decodeThroughput: Double = 0,
        synthesisMillis: Double = 0,
        profileMillis: Double = 0,
        compressMillis: Double = 0,
        kvByteSeconds: Double = 0,
        headRowShares: HeadRowShares? = nil
    ) {
        self.policy = policy
        self.budget = budget
        self.sequences = sequences
        self.decodeTokens = decodeTokens
        self.durationSeconds = durationSeconds
        self.tokensPerSecond = tokensPerSecond
        self.decodeP50Micros = decodeP50Micros
        self.decodeP99Micros = decodeP99Micros
        self.decodeMaxMicros = decodeMaxMicros
        self.prefillP50Micros = prefillP50Micros
        self.prefillP99Micros = prefillP99Micros
        self.peakKVBytes = peakKVBytes
        self.meanKVBytes = meanKVBytes
        self.fullKVBytes = fullKVBytes
        self.compressedKVBytes = compressedKVBytes
        self.saving = saving
        self.outputError = outputError
        self.needleAccuracy = needleAccuracy
        self.auditedSequences = auditedSequences
        self.errors = errors
        self.errorMessages = errorMessages
        self.refusals = refusals
        self.retries = retries
        self.workers = workers
        self.decodeLatencyPercentiles = decodeLatencyPercentiles
        self.decodeThroughput = decodeThroughput
        self.synthesisMillis = synthesisMillis
        self.profileMillis = profileMillis
        self.compressMillis = compressMillis
        self.kvByteSeconds = kvByteSeconds
        headShareMin = headRowShares?.min
        headShareMax = headRowShares?.max
    }

    /// `headShareMin` and `headShareMax` together.
    public var headRowShares: HeadRowShares? {
        guard let headShareMin, let headShareMax else { return nil }
        return HeadRowShares(min: headShareMin, max: headShareMax)
    }
}

/// One worker's peaks during a policy's run.
public struct WorkerPeak: Sendable, Codable, Hashable {
    public var id: String
    public var peakKVBytes: UInt64
    /// Peak resident set size of the worker process.
    public var peakRSSBytes: UInt64
    /// Peak bytes of full-cache copies kept for audited sequences (not part of the accounted bytes).
    public var peakAuditBytes: UInt64

    public init(id: String, peakKVBytes: UInt64, peakRSSBytes: UInt64, peakAuditBytes: UInt64) {
        self.id = id
        self.peakKVBytes = peakKVBytes
        self.peakRSSBytes = peakRSSBytes
        self.peakAuditBytes = peakAuditBytes
    }
}

public struct LatencyPoint: Sendable, Codable, Hashable {
    public var percentile: Double
    public var micros: UInt64

    public init(percentile: Double, micros: UInt64) {
        self.percentile = percentile
        self.micros = micros
    }
}

/// One worker's footprint at one instant of a policy's run (the `--csv` rows, the report's charts).
public struct FootprintSample: Sendable, Codable, Hashable {
    public var policy: String
    /// Since the policy's run started.
    public var elapsedMillis: Int
    public var worker: String
    public var kvBytes: UInt64
    public var textBytes: UInt64
    public var imageBytes: UInt64
    public var videoBytes: UInt64
    public var auditBytes: UInt64
    public var rssBytes: UInt64
    public var liveSequences: Int

    public init(
        policy: String,
        elapsedMillis: Int,
        worker: String,
        kvBytes: UInt64,
        textBytes: UInt64,
        imageBytes: UInt64,
        videoBytes: UInt64,
        auditBytes: UInt64,
        rssBytes: UInt64,
        liveSequences: Int
    ) {
        self.policy = policy
        self.elapsedMillis = elapsedMillis
        self.worker = worker
        self.kvBytes = kvBytes
        self.textBytes = textBytes
        self.imageBytes = imageBytes
        self.videoBytes = videoBytes
        self.auditBytes = auditBytes
        self.rssBytes = rssBytes
        self.liveSequences = liveSequences
    }
}

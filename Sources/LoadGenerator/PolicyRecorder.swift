import ClusterWire
import Histogram
import KVCacheCore

/// Everything one policy's run records, from many sequence tasks at once.
actor PolicyRecorder {
    let policy: String
    private let start: ContinuousClock.Instant
    private var decode = PolicyRecorder.histogram()
    private var prefill = PolicyRecorder.histogram()
    private(set) var sequences = 0
    private(set) var live = 0
    private(set) var decodeTokens = 0
    private(set) var errors = 0
    private var errorMessages: [String] = []
    private(set) var refusals = 0
    private(set) var retries = 0
    private var audited = 0
    private var fidelity = FidelityReport()
    private var fullBytes: UInt64 = 0
    private var compressedBytes: UInt64 = 0
    private var timedSteps = 0
    private var timedStepSeconds = 0.0
    private var work = PrefillWork()
    private var byteSeconds = 0.0
    /// Sums over the sequences that reported head row shares, and how many did.
    private var headShareSums = HeadRowShares(min: 0, max: 0)
    private var headShareSequences = 0
    private(set) var samples: [FootprintSample] = []
    private(set) var clusterBytes: UInt64 = 0
    private var finished: ContinuousClock.Instant?

    init(policy: String, start: ContinuousClock.Instant) {
        self.policy = policy
        self.start = start
    }

    /// Microsecond latencies from 1 µs to an hour at three significant digits.
    static func histogram() -> Histogram<UInt64> {
        Histogram(highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: .three)
    }

    func started() { live += 1 }

    func prefilled(after duration: Duration) { _ = prefill.record(duration.wholeMicroseconds) }

    func decoded(after duration: Duration, timed: Bool) {
        decodeTokens += 1
        guard timed else { return }
        let micros = duration.wholeMicroseconds
        _ = decode.record(micros)
        timedSteps += 1
        timedStepSeconds += Double(micros) / 1e6
    }

    /// A sequence that ran to the end: its bytes at the last step, the workers' prefill compute, its
    /// footprint integral, how its heads kept the prompt, and its audit when it had one.
    func completed(
        kvBytes: UInt64,
        fullKVBytes: UInt64,
        work sequenceWork: PrefillWork,
        byteSeconds footprint: Double,
        headRowShares: HeadRowShares?,
        fidelity audit: FidelityReport?
    ) {
        live -= 1
        sequences += 1
        compressedBytes += kvBytes
        fullBytes += fullKVBytes
        work.add(sequenceWork)
        byteSeconds += footprint
        if let headRowShares {
            headShareSums.min += headRowShares.min
            headShareSums.max += headRowShares.max
            headShareSequences += 1
        }
        if let audit {
            audited += 1
            fidelity.merge(audit)
        }
        finished = .now
    }

    func failed(_ error: any Error) {
        live -= 1
        errors += 1
        let message = "\(error)"
        if errorMessages.count < 5, !errorMessages.contains(message) { errorMessages.append(message) }
    }

    func refused() { refusals += 1 }
    func retried() { retries += 1 }

    func sampled(_ batch: [FootprintSample]) {
        samples += batch
        clusterBytes = batch.reduce(0) { $0 + $1.kvBytes }
    }

    var elapsed: Duration { (finished ?? .now) - start }

    private func perSequence(_ total: Double) -> Double { sequences == 0 ? 0 : total / Double(sequences) }

    /// The policy's figures once every sequence has ended.
    func result(budget: Double) -> PolicyResult {
        let seconds = Double(elapsed.wholeMicroseconds) / 1e6
        let instants = Dictionary(grouping: samples, by: \.elapsedMillis).values.map { batch in
            batch.reduce(UInt64(0)) { $0 + $1.kvBytes }
        }
        let workers = Dictionary(grouping: samples, by: \.worker).map { id, rows in
            WorkerPeak(
                id: id,
                peakKVBytes: rows.map(\.kvBytes).max() ?? 0,
                peakRSSBytes: rows.map(\.rssBytes).max() ?? 0,
                peakAuditBytes: rows.map(\.auditBytes).max() ?? 0
            )
        }.sorted { $0.id < $1.id }
        let percentiles = [0, 50, 75, 90, 95, 99, 99.9, 99.99, 100].map { p in
            LatencyPoint(percentile: p, micros: decode.totalCount == 0 ? 0 : decode.valueAtPercentile(p))
        }
        return PolicyResult(
            policy: policy,
            budget: budget,
            sequences: sequences,
            decodeTokens: decodeTokens,
            durationSeconds: seconds,
            tokensPerSecond: seconds > 0 ? Double(decodeTokens) / seconds : 0,
            decodeP50Micros: decode.totalCount == 0 ? 0 : decode.valueAtPercentile(50),
            decodeP99Micros: decode.totalCount == 0 ? 0 : decode.valueAtPercentile(99),
            decodeMaxMicros: decode.totalCount == 0 ? 0 : decode.max,
            prefillP50Micros: prefill.totalCount == 0 ? 0 : prefill.valueAtPercentile(50),
            prefillP99Micros: prefill.totalCount == 0 ? 0 : prefill.valueAtPercentile(99),
            peakKVBytes: instants.max() ?? 0,
            meanKVBytes: instants.isEmpty ? 0 : instants.reduce(0, +) / UInt64(instants.count),
            fullKVBytes: fullBytes,
            compressedKVBytes: compressedBytes,
            saving: fullBytes == 0 ? 0 : 1 - Double(compressedBytes) / Double(fullBytes),
            outputError: audited == 0 ? nil : fidelity.outputError,
            needleAccuracy: fidelity.needleAccuracy,
            auditedSequences: audited,
            errors: errors,
            errorMessages: errorMessages,
            refusals: refusals,
            retries: retries,
            workers: workers,
            decodeLatencyPercentiles: percentiles,
            decodeThroughput: timedStepSeconds > 0 ? Double(timedSteps) / timedStepSeconds : 0,
            synthesisMillis: perSequence(Double(work.synthesisMicros)) / 1000,
            profileMillis: perSequence(Double(work.profileMicros)) / 1000,
            compressMillis: perSequence(Double(work.compressMicros)) / 1000,
            kvByteSeconds: perSequence(byteSeconds),
            headRowShares: headShareSequences == 0
                ? nil
                : HeadRowShares(
                    min: headShareSums.min / Double(headShareSequences),
                    max: headShareSums.max / Double(headShareSequences)
                )
        )
    }
}

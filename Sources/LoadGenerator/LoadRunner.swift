public import Client
public import ClusterSecurity
public import ClusterTransport
import ClusterWire
import Foundation
import KVCacheCore
public import Logging
import Tracing
import Workloads

/// A snapshot for the live progress line.
public struct BenchProgress: Sendable {
    public var policy: String
    public var elapsed: Duration
    public var sequencesDone: Int
    public var live: Int
    public var tokensPerSecond: Double
    /// The cluster's accounted K/V bytes at the latest sample.
    public var kvBytes: UInt64
    public var errors: Int
    public var refusals: Int
}

/// Drives a running cluster with a plan's traffic, once per policy, and measures each run.
public enum LoadRunner {
    /// Runs every policy of `plan` in turn against the coordinator at `coordinator`, as the tenant of
    /// the client certificate in `security` (insecure: tenant `bench`); `progress` is called about
    /// once a second.
    public static func run(
        _ plan: BenchPlan,
        coordinator: NodeAddress,
        security: TransportSecurity,
        workers: Int,
        logger: Logger,
        progress: @escaping @Sendable (BenchProgress) -> Void = { _ in }
    ) async throws -> (report: BenchReport, samples: [FootprintSample]) {
        try await TesseraClient.withClient(
            coordinator: coordinator,
            security: security,
            tenant: security.identity == nil ? "bench" : nil,
            nodeID: "bench",
            logger: logger
        ) { client in
            var results: [PolicyResult] = []
            var samples: [FootprintSample] = []
            for (index, policy) in plan.policies.enumerated() {
                try await drain(client)
                let recorder = try await runPolicy(plan, index: index, client: client, progress: progress)
                results.append(await recorder.result(budget: policy.retention))
                samples += await recorder.samples
            }
            let (loop, load): (String, Double) =
                switch plan.loop {
                case .closed(let concurrency): ("closed", Double(concurrency))
                case .open(let rate, _): ("open", rate)
                }
            let report = BenchReport(
                workload: plan.workloadName,
                model: plan.geometry.name,
                workers: workers,
                seed: plan.seed,
                loop: loop,
                load: load,
                policies: results
            )
            return (report, samples)
        }
    }

    /// Waits (up to 30 s) until the cluster accounts no bytes, so that a policy's samples are its own.
    static func drain(_ client: TesseraClient) async throws {
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            let status = try await client.status()
            if status.totalKVBytes == 0 && status.workers.allSatisfy({ $0.liveSequences == 0 }) { return }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    static func runPolicy(
        _ plan: BenchPlan,
        index policyIndex: Int,
        client: TesseraClient,
        progress: @escaping @Sendable (BenchProgress) -> Void
    ) async throws -> PolicyRecorder {
        let start = ContinuousClock.now
        let recorder = PolicyRecorder(policy: plan.policies[policyIndex].name, start: start)
        let driver = SequenceDriver(plan: plan, policyIndex: policyIndex, client: client, recorder: recorder)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await sample(client, recorder: recorder, every: plan.sampleInterval, since: start) }
            group.addTask {
                while true {
                    try await Task.sleep(for: .seconds(1))
                    progress(await snapshot(recorder))
                }
            }
            try await driver.run(stop: plan.stop, loop: plan.loop, start: start)
            group.cancelAll()
            try? await sampleOnce(client, recorder: recorder, since: start)
            progress(await snapshot(recorder))
        }
        return recorder
    }

    static func snapshot(_ recorder: PolicyRecorder) async -> BenchProgress {
        let elapsed = await recorder.elapsed
        let seconds = Double(elapsed.wholeMicroseconds) / 1e6
        return BenchProgress(
            policy: recorder.policy,
            elapsed: elapsed,
            sequencesDone: await recorder.sequences,
            live: await recorder.live,
            tokensPerSecond: seconds > 0 ? Double(await recorder.decodeTokens) / seconds : 0,
            kvBytes: await recorder.clusterBytes,
            errors: await recorder.errors,
            refusals: await recorder.refusals
        )
    }

    /// Samples the cluster's footprint every `interval` until cancelled.
    static func sample(
        _ client: TesseraClient,
        recorder: PolicyRecorder,
        every interval: Duration,
        since start: ContinuousClock.Instant
    ) async throws {
        while true {
            try await sampleOnce(client, recorder: recorder, since: start)
            try await Task.sleep(for: interval)
        }
    }

    static func sampleOnce(
        _ client: TesseraClient,
        recorder: PolicyRecorder,
        since start: ContinuousClock.Instant
    ) async throws {
        let status = try await client.status()
        let elapsed = Int((ContinuousClock.now - start).wholeMicroseconds / 1000)
        await recorder.sampled(FootprintSampler.samples(status, policy: recorder.policy, elapsedMillis: elapsed))
    }
}

/// Turns a cluster status into one footprint sample per live worker.
public enum FootprintSampler {
    public static func samples(_ status: ClusterStatus, policy: String, elapsedMillis: Int) -> [FootprintSample] {
        status.workers.filter { $0.state != "dead" }.map { worker in
            FootprintSample(
                policy: policy,
                elapsedMillis: elapsedMillis,
                worker: worker.id,
                kvBytes: worker.kvBytes,
                textBytes: worker.kvBytesByModality["text"] ?? 0,
                imageBytes: worker.kvBytesByModality["image"] ?? 0,
                videoBytes: worker.kvBytesByModality["video"] ?? 0,
                auditBytes: worker.auditBytes,
                rssBytes: worker.rssBytes,
                liveSequences: worker.liveSequences
            )
        }
    }
}

/// Runs the sequences of one policy's run: open (retrying refusals after their hint), prefill from
/// the workload seed, decode every step, close.
struct SequenceDriver: Sendable {
    let plan: BenchPlan
    let policyIndex: Int
    let client: TesseraClient
    let recorder: PolicyRecorder

    /// How long one sequence keeps retrying a refused open before it counts as an error.
    static let admissionPatience = Duration.seconds(60)

    func run(stop: BenchPlan.Stop, loop: BenchPlan.Loop, start: ContinuousClock.Instant) async throws {
        func more(_ index: Int) -> Bool {
            switch stop {
            case .after(let duration): return ContinuousClock.now - start < duration
            case .sequences(let count): return index < count
            }
        }
        switch loop {
        case .closed(let concurrency):
            let next = IndexCounter()
            try await withThrowingDiscardingTaskGroup { group in
                for _ in 0..<concurrency {
                    group.addTask {
                        while true {
                            let index = await next.take()
                            guard more(index) else { return }
                            // A failing cluster is not hammered: a failed sequence pauses its runner.
                            if await !runSequence(index, due: nil) { try await Task.sleep(for: .milliseconds(100)) }
                        }
                    }
                }
            }
        case .open(let rate, let maxInFlight):
            var arrivals = ArrivalSchedule(rate: rate, seed: plan.seed, start: start)
            await withTaskGroup(of: Void.self) { group in
                var index = 0
                var inFlight = 0
                while more(index) {
                    let due = arrivals.next()
                    try? await Task.sleep(until: due, clock: .continuous)
                    if inFlight >= maxInFlight {
                        await group.next()
                        inFlight -= 1
                    }
                    let current = index
                    group.addTask { _ = await runSequence(current, due: due) }
                    inFlight += 1
                    index += 1
                }
            }
        }
    }

    /// One sequence, start to end, as one trace (exported when the process bootstrapped a tracer);
    /// failures are counted, never thrown. Returns whether it completed.
    func runSequence(_ index: Int, due: ContinuousClock.Instant?) async -> Bool {
        let policy = plan.policies[policyIndex]
        let sequenceID = UInt64(policyIndex + 1) << 32 | UInt64(index)
        return await withSpan("sequence", ofKind: .client) { span in
            span.attributes["tessera.sequence.id"] = "\(sequenceID)"
            span.attributes["tessera.policy"] = policy.name
            return await drive(index, id: sequenceID, policy: policy, due: due)
        }
    }

    private func drive(
        _ index: Int,
        id sequenceID: UInt64,
        policy: BenchPlan.Policy,
        due: ContinuousClock.Instant?
    ) async -> Bool {
        let audited = plan.isAudited(index)
        await recorder.started()
        let source: SequenceSource
        do {
            source = try SequenceSource(plan, index: index)
        } catch {
            await recorder.failed(error)
            return false
        }
        let geometry = source.trace.geometry
        // Latencies count from when the sequence was due (open loop), so queueing is not hidden.
        let begin = due ?? .now
        do {
            try await open(
                sequenceID,
                geometry: geometry,
                layout: source.trace.layout,
                policy: policy,
                decodeTokens: source.trace.decodeSteps
            )
            var footprint = Footprint(since: .now)
            switch source {
            case .generated(let trace, let settings):
                _ = try await client.prefillSynthetic(
                    sequenceID,
                    workload: trace.preset.rawValue,
                    seed: plan.seed,
                    index: index,
                    settings: settings,
                    audit: audited
                )
            case .file(let file, _):
                _ = try await client.prefill(sequenceID, trace: file, as: file.prefillScalarType, audit: audited)
            }
            var last = DecodeStep()
            var fidelity: FidelityReport?
            for step in 0..<source.trace.decodeSteps {
                let stepStart = ContinuousClock.now
                let previous = last
                last = try await client.decodeStep(
                    sequenceID,
                    step: step,
                    geometry: geometry,
                    inputs: source.decodeInputs(step: step)
                )
                // Until its first step returns (with the budget applied), the sequence is held whole.
                footprint.held(step == 0 ? last.fullKVBytes : previous.kvBytes, until: .now)
                if step == 0 {
                    // The first step waits for the budget (gather, allocate, compress): it ends the
                    // time to first token, not a decode step of the compressed cache.
                    await recorder.prefilled(after: .now - begin)
                    await recorder.decoded(after: .zero, timed: false)
                } else {
                    // Audited steps also decode the full cache: their latency is not the policy's.
                    await recorder.decoded(after: .now - stepStart, timed: !audited || plan.auditFraction >= 1)
                }
                if let audit = last.fidelity {
                    var total = fidelity ?? FidelityReport()
                    total.merge(audit)
                    fidelity = total
                }
            }
            _ = try await client.close(sequenceID)
            footprint.held(last.kvBytes, until: .now)
            await recorder.completed(
                kvBytes: last.kvBytes,
                fullKVBytes: last.fullKVBytes,
                work: last.work,
                byteSeconds: footprint.byteSeconds,
                headRowShares: last.headRowShares,
                fidelity: fidelity
            )
            return true
        } catch {
            _ = try? await client.close(sequenceID)
            await recorder.failed(error)
            return false
        }
    }

    /// Opens the sequence, waiting out RESOURCE_EXHAUSTED refusals for their retry-after hint.
    func open(
        _ sequenceID: UInt64,
        geometry: ModelGeometry,
        layout: PromptLayout,
        policy: BenchPlan.Policy,
        decodeTokens: Int
    ) async throws {
        let deadline = ContinuousClock.now + Self.admissionPatience
        while true {
            do {
                _ = try await client.openSequence(
                    sequenceID,
                    geometry: geometry,
                    layout: layout,
                    policy: policy.policy,
                    retention: policy.retention,
                    decodeTokens: decodeTokens
                )
                return
            } catch let error as WireError where error.code == .resourceExhausted {
                await recorder.refused()
                guard let wait = error.retryAfter, ContinuousClock.now + wait < deadline else { throw error }
                try await Task.sleep(for: wait)
                await recorder.retried()
            }
        }
    }
}

/// Where a sequence's tensors come from: the workers expand the workload's seed (`generated`), or
/// the client sends a trace file's (`file`, with every decode step's inputs read before it opens).
enum SequenceSource {
    case generated(SequenceTrace, TraceSettings)
    case file(TraceFile, decode: [[Int: DecodeStepInput]])

    init(_ plan: BenchPlan, index: Int) throws {
        guard plan.traces.isEmpty else {
            let file = plan.traces[index % plan.traces.count]
            let layers = try (0..<file.geometry.layers).map { try file.decode(layer: $0) }
            let steps = (0..<file.decodeSteps).map { step in
                Dictionary(uniqueKeysWithValues: layers.indices.map { ($0, layers[$0][step]) })
            }
            self = .file(file, decode: steps)
            return
        }
        let workload = plan.workload
        let preset = workload.preset(forSequence: index, seed: plan.seed)
        let generator = TraceGenerator(
            preset: preset,
            geometry: workload.geometry,
            settings: workload.traceSettings,
            seed: plan.seed
        )
        self = .generated(generator.sequence(index), workload.traceSettings)
    }

    var trace: any PromptTrace {
        switch self {
        case .generated(let trace, _): trace
        case .file(let file, _): file
        }
    }

    /// Step `step`'s inputs per layer; nil when the workers expand them from the seed.
    func decodeInputs(step: Int) -> [Int: DecodeStepInput]? {
        guard case .file(_, let steps) = self else { return nil }
        return steps[step]
    }
}

/// One sequence's K/V bytes × seconds, accumulated interval by interval.
struct Footprint {
    private(set) var byteSeconds = 0.0
    private var since: ContinuousClock.Instant

    init(since start: ContinuousClock.Instant) { since = start }

    /// Counts `bytes` as held from the end of the previous interval until `now`.
    mutating func held(_ bytes: UInt64, until now: ContinuousClock.Instant) {
        byteSeconds += Double(bytes) * Double((now - since).wholeMicroseconds) / 1e6
        since = now
    }
}

/// Hands out sequence indices to the closed loop's runners.
actor IndexCounter {
    private var next = 0

    func take() -> Int {
        defer { next += 1 }
        return next
    }
}

/// Poisson arrival times: exponential gaps drawn from a seeded generator.
struct ArrivalSchedule {
    let meanGap: Double
    var state: UInt64
    var time: ContinuousClock.Instant

    init(rate: Double, seed: UInt64, start: ContinuousClock.Instant) {
        meanGap = 1 / rate
        state = seed ^ 0xA076_1D64_78BD_642F
        time = start
    }

    mutating func next() -> ContinuousClock.Instant {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        let uniform = (Double(state >> 11) + 0.5) / Double(1 << 53)
        time = time + .seconds(-log(uniform) * meanGap)
        return time
    }
}

public import KVCacheCore
public import Workloads

/// What `tessera eval` runs: every policy at every budget over the same seeded traces, in one process.
public struct EvaluationRequest: Sendable {
    public var preset: WorkloadPreset
    public var geometry: ModelGeometry
    public var policies: [CompressionPolicy]
    public var budgets: [Double]
    public var sequences: Int
    public var seed: UInt64
    public var scalar: ScalarType
    public var traceSettings: TraceSettings
    /// Traces read from files (`tessera eval --traces`): when any are given they are evaluated instead
    /// of generated ones, `geometry` must be theirs and `sequences` their count.
    public var traceFiles: [TraceFile]

    public init(
        preset: WorkloadPreset,
        geometry: ModelGeometry,
        policies: [CompressionPolicy],
        budgets: [Double],
        sequences: Int,
        seed: UInt64,
        scalar: ScalarType = .float32,
        traceSettings: TraceSettings = .defaults,
        traceFiles: [TraceFile] = []
    ) {
        self.preset = preset
        self.geometry = geometry
        self.policies = policies
        self.budgets = budgets
        self.sequences = sequences
        self.seed = seed
        self.scalar = scalar
        self.traceSettings = traceSettings
        self.traceFiles = traceFiles
    }
}

/// One row of the evaluation table; byte figures are per sequence (mean over the traces).
public struct EvaluationResult: Sendable, Codable, Hashable {
    public var policy: String
    public var budget: Double
    public var keptBytes: Int
    public var fullBytes: Int
    public var outputError: Double
    public var outputCosine: Double
    public var massRecall: Double
    public var needleAccuracy: Double?
    public var hitRate: Double
    public var compressMillis: Double
    public var mergedRows: Int
    /// The smallest and largest share of the prompt's rows that one KV head of one layer keeps after
    /// compression (mean over the traces): how unevenly a policy spreads its budget over layers and
    /// heads, whether the coordinator's budgets do it or the compression (AdaKV's split over heads).
    public var headShareMin: Double
    public var headShareMax: Double
}

/// Progress of a long evaluation, for a status line.
public struct EvaluationProgress: Sendable {
    public var sequence: Int
    public var sequences: Int
    public var phase: String
    public var layersDone: Int
    public var layers: Int
}

/// Runs an `EvaluationRequest`. Per sequence, the first pass profiles every layer's prefill attention
/// once for all policies (the rows each needs are suffixes, so one backward pass serves them all); the
/// allocators then split each budget over layers from the per-layer statistics alone, as the cluster's
/// coordinator does; the second pass regenerates each layer, compresses it under every policy and
/// budget, and replays the decode steps over the full and the compressed caches.
public struct EvaluationRunner: Sendable {
    public let request: EvaluationRequest

    public init(request: EvaluationRequest) throws(KVCacheError) {
        for policy in request.policies { try policy.validate() }
        if let bad = request.budgets.first(where: { !($0 > 0 && $0 <= 1) }) {
            throw KVCacheError(.invalidBudget, "budget must be in (0, 1], got \(bad)")
        }
        guard request.sequences >= 1 else {
            throw KVCacheError(.invalidSetting, "sequences must be ≥ 1, got \(request.sequences)")
        }
        if let other = request.traceFiles.first(where: { $0.geometry != request.geometry }) {
            throw KVCacheError(
                .invalidSetting,
                "\(other.path) is a trace of \(other.geometry.name), not \(request.geometry.name): evaluate one model at a time"
            )
        }
        guard request.traceFiles.isEmpty || request.traceFiles.count == request.sequences else {
            throw KVCacheError(
                .invalidSetting,
                "sequences must be the number of trace files, \(request.traceFiles.count)"
            )
        }
        self.request = request
    }

    /// Runs on up to `parallelism` layers at a time and reports progress after each layer.
    public func run(
        parallelism: Int,
        progress: @escaping @Sendable (EvaluationProgress) -> Void = { _ in }
    ) async throws -> [EvaluationResult] {
        switch request.scalar {
        case .float32: try await run(Float.self, parallelism: parallelism, progress: progress)
        case .float16: try await run(Float16.self, parallelism: parallelism, progress: progress)
        }
    }

    private struct Key: Hashable {
        var policy: Int
        var budget: Int
    }

    private struct Profiled: Sendable {
        var profile: AttentionProfile
        var statistics: [LayerStatistics]
        var seconds: Double
    }

    private struct Tally {
        var kept = 0
        var full = 0
        var fidelity = FidelityReport()
        var seconds = 0.0
        var merged = 0
        var headShareMin = 0.0
        var headShareMax = 0.0

        mutating func merge(_ other: Tally) {
            kept += other.kept
            full += other.full
            fidelity.merge(other.fidelity)
            seconds += other.seconds
            merged += other.merged
            headShareMin += other.headShareMin
            headShareMax += other.headShareMax
        }
    }

    private func run<S: KVScalar>(
        _: S.Type,
        parallelism: Int,
        progress: @escaping @Sendable (EvaluationProgress) -> Void
    ) async throws -> [EvaluationResult] {
        let geometry = request.geometry
        let generator = TraceGenerator(
            preset: request.preset,
            geometry: geometry,
            settings: request.traceSettings,
            seed: request.seed
        )
        let traces: [any PromptTrace] =
            request.traceFiles.isEmpty ? (0..<request.sequences).map(generator.sequence) : request.traceFiles
        var totals: [Key: Tally] = [:]
        for (index, trace) in traces.enumerated() {
            let layout = trace.layout
            let m = layout.promptLength
            let requirements = request.policies.map { $0.requirements(layout: layout) }
            let union = requirements.reduce(ProfileRequirements()) { $0.union($1) }
            let policies = request.policies

            // Pass 1: profile each layer once; per-policy statistics.
            let profiles: [Profiled] = try await forEachLayer(parallelism: parallelism) { layer in
                let prefill = try trace.prefill(layer: layer)
                let clock = ContinuousClock()
                let generated = clock.now
                let profile = try AttentionProfile(prefill: prefill, requirements: union)
                let statistics = policies.map {
                    LayerStatistics(layer: layer, profile: profile, layout: layout, policy: $0)
                }
                return Profiled(profile: profile, statistics: statistics, seconds: (clock.now - generated).seconds)
            } progress: { done in
                progress(
                    .init(
                        sequence: index,
                        sequences: request.sequences,
                        phase: "profile",
                        layersDone: done,
                        layers: geometry.layers
                    )
                )
            }
            // The shared pass is charged to each policy in proportion to the attention rows it needed.
            let totalEntries = union.firstRow.map { AttentionProfile.entries(promptLength: m, start: $0) } ?? 0
            let profileShare: [Double] = requirements.map { r in
                guard let first = r.firstRow, totalEntries > 0 else { return 0 }
                return Double(AttentionProfile.entries(promptLength: m, start: first)) / Double(totalEntries)
            }
            let profileSeconds = profiles.reduce(0) { $0 + $1.seconds }

            // Allocation: from statistics only.
            var budgets: [Key: [LayerBudget]] = [:]
            var allocationSeconds: [Key: Double] = [:]
            for (p, policy) in policies.enumerated() {
                let statistics = profiles.map { $0.statistics[p] }
                for (b, retention) in request.budgets.enumerated() {
                    let clock = ContinuousClock()
                    let start = clock.now
                    budgets[Key(policy: p, budget: b)] = try BudgetAllocator.allocate(
                        policy: policy,
                        retention: retention,
                        geometry: geometry,
                        statistics: statistics
                    )
                    allocationSeconds[Key(policy: p, budget: b)] = (clock.now - start).seconds
                }
            }

            // Pass 2: compress under every policy and budget, replay decode, compare with the full cache.
            let frozenBudgets = budgets
            let budgetCount = request.budgets.count
            let needle = trace.needle
            let layerTallies: [[Key: (tally: Tally, headShares: HeadRowShares?)]] = try await forEachLayer(
                parallelism: parallelism
            ) { layer in
                let prefill = try trace.prefill(layer: layer)
                let steps = try trace.decode(layer: layer)
                let profile = profiles[layer].profile
                let full = try LayerCompressor.compress(
                    prefill,
                    layout: layout,
                    profile: nil,
                    budget: LayerBudget(
                        layer: layer,
                        heads: Array(
                            repeating: HeadBudget(capacity: m),
                            count: geometry.kvHeads
                        )
                    ),
                    policy: .full,
                    as: S.self
                ).heads
                let fullBytes = full.reduce(0) { $0 + $1.payloadBytes }
                let reference = DecodeReference(geometry: geometry, promptLength: m, full: full, steps: steps)
                let check = needle.map { needle in
                    NeedleCheck(
                        probes: needle.probes.filter { $0.layer == layer }.map { ($0.queryHead, $0.step) },
                        answer: needle.answer,
                        decode: { needle.decodeAnswer(output: $0) }
                    )
                }
                var tallies: [Key: (tally: Tally, headShares: HeadRowShares?)] = [:]
                for (p, policy) in policies.enumerated() {
                    for b in 0..<budgetCount {
                        let key = Key(policy: p, budget: b)
                        let clock = ContinuousClock()
                        let start = clock.now
                        let result = try LayerCompressor.compress(
                            prefill,
                            layout: layout,
                            profile: profile,
                            budget: frozenBudgets[key]![layer],
                            policy: policy,
                            as: S.self
                        )
                        let seconds = (clock.now - start).seconds
                        var compressed = result.heads
                        let keptBytes = compressed.reduce(0) { $0 + $1.payloadBytes }
                        // Before decode replay appends its rows.
                        let shares = HeadRowShares(heads: compressed, promptLength: m)
                        let fidelity = FidelityEvaluator.evaluate(
                            geometry: geometry,
                            reference: reference,
                            compressed: &compressed,
                            steps: steps,
                            needle: check
                        )
                        tallies[key] = (
                            Tally(
                                kept: keptBytes,
                                full: fullBytes,
                                fidelity: fidelity,
                                seconds: seconds,
                                merged: result.mergedRows
                            ),
                            shares
                        )
                    }
                }
                return tallies
            } progress: { done in
                progress(
                    .init(
                        sequence: index,
                        sequences: request.sequences,
                        phase: "compress",
                        layersDone: done,
                        layers: geometry.layers
                    )
                )
            }
            var headShares: [Key: HeadRowShares] = [:]
            for tallies in layerTallies {
                for (key, layer) in tallies {
                    totals[key, default: Tally()].merge(layer.tally)
                    headShares[key] = headShares[key].merged(with: layer.headShares)
                }
            }
            for (key, seconds) in allocationSeconds {
                totals[key, default: Tally()].seconds += seconds + profileSeconds * profileShare[key.policy]
            }
            for (key, shares) in headShares {
                totals[key, default: Tally()].headShareMin += shares.min
                totals[key, default: Tally()].headShareMax += shares.max
            }
        }
        let n = Double(request.sequences)
        var results: [EvaluationResult] = []
        for (p, policy) in request.policies.enumerated() {
            for (b, retention) in request.budgets.enumerated() {
                let t = totals[Key(policy: p, budget: b)] ?? Tally()
                results.append(
                    EvaluationResult(
                        policy: policy.label,
                        budget: retention,
                        keptBytes: Int((Double(t.kept) / n).rounded()),
                        fullBytes: Int((Double(t.full) / n).rounded()),
                        outputError: t.fidelity.outputError,
                        outputCosine: t.fidelity.outputCosine,
                        massRecall: t.fidelity.massRecall,
                        needleAccuracy: t.fidelity.needleAccuracy,
                        hitRate: t.fidelity.hitRate,
                        compressMillis: t.seconds * 1000 / n,
                        mergedRows: Int((Double(t.merged) / n).rounded()),
                        headShareMin: t.headShareMin / n,
                        headShareMax: t.headShareMax / n
                    )
                )
            }
        }
        return results
    }

    /// Runs `body` for every layer with at most `parallelism` in flight; results in layer order.
    private func forEachLayer<T: Sendable>(
        parallelism: Int,
        _ body: @escaping @Sendable (Int) throws -> T,
        progress: @escaping @Sendable (Int) -> Void
    ) async throws -> [T] {
        let layers = request.geometry.layers
        return try await withThrowingTaskGroup(of: (Int, T).self) { group in
            var results = [T?](repeating: nil, count: layers)
            var next = 0
            var done = 0
            while next < min(layers, max(1, parallelism)) {
                let layer = next
                group.addTask { (layer, try body(layer)) }
                next += 1
            }
            while let (layer, value) = try await group.next() {
                results[layer] = value
                done += 1
                progress(done)
                if next < layers {
                    let layer = next
                    group.addTask { (layer, try body(layer)) }
                    next += 1
                }
            }
            return results.map { $0! }
        }
    }
}

extension Duration {
    /// The duration in seconds as a Double.
    var seconds: Double {
        let (s, attoseconds) = components
        return Double(s) + Double(attoseconds) * 1e-18
    }
}

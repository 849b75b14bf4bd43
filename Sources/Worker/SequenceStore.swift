import ClusterWire
import KVCacheCore
import Workloads

/// What a worker holds for one sequence: its shard assignment, the full prefill until the
/// coordinator's budget arrives, then the compressed cache that decode runs over.
struct HeldSequence: Sendable {
    var tenant: String
    var shardID: UInt32
    var epoch: UInt64
    var layers: Range<Int>
    var geometry: ModelGeometry
    var layout: PromptLayout
    var policy: CompressionPolicy
    var retention: Double

    var prefills: [Int: LayerPrefill] = [:]
    var profiles: [Int: AttentionProfile] = [:]
    /// Synthetic decode inputs per layer, when the prefill came as a workload seed.
    var syntheticDecode: [Int: [DecodeStepInput]]?
    var cache: ShardCache?
    /// Per compressed row, the score it competes on if memory pressure tightens the budget.
    var rowScores: [Int: [[Float]]] = [:]
    /// Whether to keep the full cache beside the compressed one and score every decode step.
    var audited = false
    var audit: AuditCopy?
    /// The planted answer of a synthetic sequence (kept for audits).
    var needle: Needle?
    var waiters: [CheckedContinuation<Void, any Error>] = []
    var nextStep = 0
    var lastResult: (step: Int, body: Tessera_V1_DecodeResult)?

    /// What the shard's layers would hold uncompressed with `rows` rows per head, in the storage type
    /// of the cache (Float32 before compression).
    func fullBytes(rows: Int) -> Int {
        let scalar = if case .float16 = cache { MemoryLayout<Float16>.size } else { MemoryLayout<Float>.size }
        return layers.count * geometry.kvHeads * 2 * geometry.headDim * rows * scalar
    }

    /// K/V bytes held now, in all and by modality.
    var bytes: (total: Int, byModality: [String: Int]) {
        if let cache { return cache.bytes }
        var total = 0
        var byModality: [String: Int] = [:]
        let rowBytes = geometry.kvHeads * 2 * geometry.headDim * MemoryLayout<Float>.size
        let perLayer = ModalityTag.bytesByKind(layout.tags, rowBytes: rowBytes)
        for _ in prefills.values {
            total += layout.promptLength * rowBytes
            byModality.merge(perLayer, uniquingKeysWith: +)
        }
        return (total, byModality)
    }
}

/// The sequences a worker holds. Tensor work happens outside the actor where it can; decode mutates
/// the cache in place here, one step of one sequence at a time.
actor SequenceStore {
    private var sequences: [UInt64: HeldSequence] = [:]

    func assign(_ sequenceID: UInt64, _ held: HeldSequence) throws(WireError) {
        if let existing = sequences[sequenceID] {
            guard existing.tenant == held.tenant, existing.shardID == held.shardID else {
                throw WireError(.badRequest, "sequence \(sequenceID) already holds shard \(existing.shardID) here")
            }
            sequences[sequenceID]!.epoch = max(existing.epoch, held.epoch)
            return
        }
        sequences[sequenceID] = held
    }

    /// The sequence if `tenant` owns it and the write carries the current shard and epoch.
    func checked(_ sequenceID: UInt64, tenant: String, shardID: UInt32, epoch: UInt64) throws(WireError) -> HeldSequence {
        guard let held = sequences[sequenceID] else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not held by this worker")
        }
        guard held.tenant == tenant else {
            throw WireError(.wrongTenant, "sequence \(sequenceID) belongs to another tenant")
        }
        guard held.shardID == shardID else {
            throw WireError(.notPrimary, "this worker holds shard \(held.shardID) of sequence \(sequenceID), not \(shardID)")
        }
        guard held.epoch == epoch else {
            throw WireError(.staleEpoch, "sequence \(sequenceID) is at epoch \(held.epoch), the write carries \(epoch)")
        }
        return held
    }

    func storePrefill(
        _ sequenceID: UInt64, prefills: [Int: LayerPrefill], profiles: [Int: AttentionProfile],
        syntheticDecode: [Int: [DecodeStepInput]]?, needle: Needle?, audited: Bool
    ) throws(WireError) -> Int {
        guard sequences[sequenceID] != nil else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) was closed during its prefill")
        }
        guard sequences[sequenceID]!.prefills.isEmpty, sequences[sequenceID]!.cache == nil else {
            throw WireError(.badRequest, "sequence \(sequenceID) was already prefilled")
        }
        sequences[sequenceID]!.prefills = prefills
        sequences[sequenceID]!.profiles = profiles
        sequences[sequenceID]!.syntheticDecode = syntheticDecode
        sequences[sequenceID]!.needle = needle
        sequences[sequenceID]!.audited = audited
        return sequences[sequenceID]!.bytes.total
    }

    /// The prefill, for compressing outside the actor.
    func prefillForCompression(_ sequenceID: UInt64) throws(WireError) -> HeldSequence {
        guard let held = sequences[sequenceID] else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not held by this worker")
        }
        if held.cache != nil { return held }
        guard !held.prefills.isEmpty else {
            throw WireError(.badRequest, "sequence \(sequenceID) has a budget but no prefill yet")
        }
        return held
    }

    /// Keeps the compressed cache (once; a repeated budget changes nothing) and drops the prefill.
    func storeCache(
        _ sequenceID: UInt64, _ cache: ShardCache, rowScores: [Int: [[Float]]], audit: AuditCopy?
    ) -> (total: Int, byModality: [String: Int])? {
        guard sequences[sequenceID] != nil else { return nil }
        if sequences[sequenceID]!.cache == nil {
            sequences[sequenceID]!.cache = cache
            sequences[sequenceID]!.rowScores = rowScores
            sequences[sequenceID]!.audit = audit
            sequences[sequenceID]!.prefills = [:]
            sequences[sequenceID]!.profiles = [:]
        }
        let waiters = sequences[sequenceID]!.waiters
        sequences[sequenceID]!.waiters = []
        for waiter in waiters { waiter.resume() }
        return sequences[sequenceID]!.bytes
    }

    /// Cuts an already compressed cache to tighter budgets (memory pressure); returns the bytes held.
    func tighten(_ sequenceID: UInt64, to budgets: [Int: LayerBudget]) -> (total: Int, byModality: [String: Int])? {
        guard var held = sequences[sequenceID], let cache = held.cache else { return nil }
        sequences[sequenceID]!.cache = nil
        let cut = cache.tightened(to: budgets, scores: held.rowScores, promptLength: held.layout.promptLength)
        held.cache = cut.cache
        held.rowScores = cut.scores
        sequences[sequenceID] = held
        return held.bytes
    }

    /// Waits until the sequence's cache is compressed (the coordinator's budget has arrived).
    func waitUntilCompressed(_ sequenceID: UInt64) async throws {
        guard let held = sequences[sequenceID] else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not held by this worker")
        }
        if held.cache != nil { return }
        try await withCheckedThrowingContinuation { continuation in
            sequences[sequenceID]!.waiters.append(continuation)
        }
    }

    /// Runs one decode step on every layer of the shard. A retry of the last step returns its result
    /// again; any other step out of order is refused.
    func decode(
        _ sequenceID: UInt64, step: Int, inputs: [Int: DecodeStepInput]?
    ) throws(WireError) -> Tessera_V1_DecodeResult {
        guard var held = sequences[sequenceID], held.cache != nil else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not held or not compressed")
        }
        if let last = held.lastResult, last.step == step { return last.body }
        guard step == held.nextStep else {
            throw WireError(.badRequest, "decode step \(step) of sequence \(sequenceID) is out of order; expected \(held.nextStep)")
        }
        // Every layer's input first, so that a refused step changes nothing.
        var stepInputs: [(layer: Int, input: DecodeStepInput)] = []
        for layer in held.layers {
            if let given = inputs?[layer] {
                stepInputs.append((layer, given))
            } else if let synthetic = held.syntheticDecode?[layer], step < synthetic.count {
                stepInputs.append((layer, synthetic[step]))
            } else {
                throw WireError(
                    .badRequest,
                    "decode step \(step) of sequence \(sequenceID) has no tensors for layer \(layer) and no "
                        + "synthetic step to expand")
            }
        }
        var result = Tessera_V1_DecodeResult()
        result.sequenceID = sequenceID
        result.shardID = held.shardID
        result.step = UInt32(step)
        sequences[sequenceID]!.cache = nil
        sequences[sequenceID]!.audit = nil
        defer { sequences[sequenceID] = held }
        let position = held.layout.promptLength + step
        var fidelity = FidelityReport()
        for (layer, input) in stepInputs {
            let outputs = held.cache!.decode(layer: layer, geometry: held.geometry, input: input, position: position)!
            held.audit?.score(
                layer: layer, step: step, geometry: held.geometry, input: input, position: position, outputs: outputs,
                into: &fidelity)
            result.outputs.append(try Tessera_V1_LayerOutput(layer: layer, output: outputs, geometry: held.geometry))
        }
        result.kvBytes = UInt64(held.cache!.totalBytes)
        result.fullKvBytes = UInt64(held.fullBytes(rows: position + 1))
        if held.audit != nil {
            result.audit.relativeErrorSum = fidelity.relativeErrorSum
            result.audit.outputs = UInt32(fidelity.outputs)
            result.audit.needleProbes = UInt32(fidelity.needleProbes)
            result.audit.needleCorrect = UInt32(fidelity.needleCorrect)
        }
        held.nextStep = step + 1
        held.lastResult = (step, result)
        return result
    }

    func close(_ sequenceID: UInt64) -> Int {
        guard let held = sequences.removeValue(forKey: sequenceID) else { return 0 }
        for waiter in held.waiters {
            waiter.resume(throwing: WireError(.unknownSequence, "sequence \(sequenceID) was closed"))
        }
        return held.bytes.total
    }

    /// Bytes held over every sequence, in all and by modality, the audit copies' bytes, and the
    /// number of sequences.
    func totals() -> (total: Int, byModality: [String: Int], audit: Int, sequences: Int) {
        var total = 0
        var audit = 0
        var byModality: [String: Int] = [:]
        for held in sequences.values {
            let bytes = held.bytes
            total += bytes.total
            audit += held.audit?.bytes ?? 0
            byModality.merge(bytes.byModality, uniquingKeysWith: +)
        }
        return (total, byModality, audit, sequences.count)
    }

    func shardIDs() -> [UInt32] { Array(Set(sequences.values.map(\.shardID))).sorted() }

    func digest(_ sequenceID: UInt64) -> UInt64? { sequences[sequenceID]?.cache?.digest }
}

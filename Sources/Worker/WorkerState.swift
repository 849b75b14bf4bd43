import ClusterTransport
import ClusterWire
import KVCacheCore
import NIOCore
import Synchronization
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
    /// The assignment as the coordinator last sent it (reported back when re-registering, and the
    /// start of a copy to another worker).
    var assignment: Tessera_V1_ShardAssignment
    /// Whether this worker is the shard's primary (accepts clients' writes and forwards them to
    /// `replicas`) or a replica (accepts writes forwarded by the primary).
    var isPrimary = true
    var replicas: [NodeAddress] = []

    var prefills: [Int: LayerPrefill] = [:]
    var profiles: [Int: AttentionProfile] = [:]
    /// The layers of an inline prefill that comes in parts, until the last part completes the shard.
    var parts = PrefillParts()
    /// Compute this copy spent on the shard before its first decode step (reported with every step).
    var work = PrefillWork()
    /// The layer statistics sent to the coordinator after prefill (small; sent again when registering
    /// with a restarted coordinator).
    var statistics: [Tessera_V1_LayerStats] = []
    /// `statistics` at the epoch this copy is at now: the coordinator takes only those.
    var currentStatistics: [Tessera_V1_LayerStats] {
        statistics.map {
            var layer = $0
            layer.epoch = epoch
            return layer
        }
    }
    /// Synthetic decode inputs per layer, when the prefill came as a workload seed.
    var syntheticDecode: [Int: [DecodeStepInput]]?
    var cache: ShardCache?
    /// How the compressed cache's heads keep the prompt: set where its prompt rows change
    /// (compression, tightening, a copy's install), reported with every step and budget.
    var headRowShares: HeadRowShares?
    /// Per compressed row, the score it competes on if memory pressure tightens the budget.
    var rowScores: [Int: [[Float]]] = [:]
    /// Whether to keep the full cache beside the compressed one and score every decode step.
    var audited = false
    var audit: AuditCopy?
    /// The planted answer of a synthetic sequence (kept for audits).
    var needle: Needle?
    /// Decode steps waiting for the budget to be applied.
    let compressedWaiters = Waiters()
    /// Budgets waiting for this copy's prefill.
    let prefillWaiters = Waiters()
    /// What is being done with the copy outside the store's lock, one thing at a time.
    var activity = Activity.idle
    /// Tightenings and copies waiting for a decode step or a copy to give the cache back.
    let idleWaiters = Waiters()
    var nextStep = 0
    var lastResult: (step: Int, body: Tessera_V1_DecodeResult)?

    /// The copy's lifecycle is its data: assigned (no prefill yet, or parts of one), prefilled
    /// (`prefills` and `profiles` until the budget), compressed (`cache`), closed (gone from the
    /// store). What runs outside the store's lock meanwhile is one of these.
    enum Activity: Sendable {
        case idle
        /// The prefill, or parts of it, are being expanded: these layers (disjoint parts may expand
        /// at once) are counted as held from the start, so that accounting never trails the memory
        /// the expansion fills.
        case expanding(Set<Int>)
        /// A decode step has the cache (and audit copy) out of the store; the bytes they held, for
        /// accounting.
        case decoding(total: Int, byModality: ModalityBytes, audit: Int)
        /// The compressed shard is being copied to another worker: decode steps are refused
        /// (UNAVAILABLE, retried by the client) so that the copy and every later write line up.
        case transferring

        /// A decode step or a copy has the cache: tightening and another copy wait.
        var holdsCache: Bool {
            switch self {
            case .decoding, .transferring: true
            case .idle, .expanding: false
            }
        }
    }

    /// Marks `layers` as no longer being expanded.
    mutating func finishExpanding(_ layers: Set<Int>) {
        let rest = expandingLayers.subtracting(layers)
        activity = rest.isEmpty ? .idle : .expanding(rest)
    }

    /// The bytes a running decode step took out of the store.
    var decoding: (total: Int, byModality: ModalityBytes, audit: Int)? {
        guard case .decoding(let total, let byModality, let audit) = activity else { return nil }
        return (total, byModality, audit)
    }

    /// What the shard's layers would hold uncompressed with `rows` rows per head, in the storage type
    /// of the cache (Float32 before compression).
    func fullBytes(rows: Int, storage: ScalarType = .float32) -> Int {
        let scalar = storage == .float16 ? MemoryLayout<Float16>.size : MemoryLayout<Float>.size
        return layers.count * geometry.kvHeads * 2 * geometry.headDim * rows * scalar
    }

    var isCompressed: Bool { cache != nil || decoding != nil }

    /// The assignment alone, for handlers: a copy that still referenced the cache would make every
    /// decode append copy the rows it shares.
    var withoutTensors: HeldSequence {
        var copy = self
        copy.prefills = [:]
        copy.profiles = [:]
        copy.parts = PrefillParts()
        copy.syntheticDecode = nil
        copy.cache = nil
        copy.audit = nil
        copy.rowScores = [:]
        return copy
    }

    var auditBytes: Int { decoding?.audit ?? audit?.bytes ?? 0 }

    /// K/V bytes held now, without the walk over row tags that `bytes` makes for the modalities.
    var totalBytes: Int {
        if let decoding { return decoding.total }
        if let cache { return cache.totalBytes }
        return uncompressedLayers * layout.promptLength * promptRowBytes
    }

    /// Layers whose prompt K/V are held uncompressed, those being expanded included.
    private var uncompressedLayers: Int {
        prefills.count + parts.prefills.count + expandingLayers.count
    }

    /// The layers whose prefill is being expanded now.
    var expandingLayers: Set<Int> {
        guard case .expanding(let layers) = activity else { return [] }
        return layers
    }

    /// Bytes of one Float32 prompt row, keys and values of every KV head.
    private var promptRowBytes: Int { geometry.kvHeads * 2 * geometry.headDim * MemoryLayout<Float>.size }

    /// K/V bytes held now, in all and by modality.
    var bytes: (total: Int, byModality: ModalityBytes) {
        if let decoding { return (decoding.total, decoding.byModality) }
        if let cache { return cache.bytes }
        return (totalBytes, ModalityBytes(layout.tags, rowBytes: promptRowBytes) * uncompressedLayers)
    }
}

/// A compressed copy's footprint after a budget: what the coordinator accounts, and how its heads
/// keep the prompt.
struct CompressedFootprint: Sendable {
    var total: Int
    var byModality: ModalityBytes
    var headRowShares: HeadRowShares?

    init(_ held: HeldSequence) {
        (total, byModality) = held.bytes
        headRowShares = held.headRowShares
    }
}

/// A shard's prefilled layers as they arrive (all in one prefill, or in parts), profiled, with their
/// statistics and the compute they took.
struct PrefillParts: Sendable {
    var prefills: [Int: LayerPrefill] = [:]
    var profiles: [Int: AttentionProfile] = [:]
    var statistics: [Tessera_V1_LayerStats] = []
    var work = PrefillWork()

    mutating func add(_ part: PrefillParts) {
        prefills.merge(part.prefills) { _, new in new }
        profiles.merge(part.profiles) { _, new in new }
        statistics += part.statistics
        work.add(part.work)
    }
}

/// What a decision that may have to wait returns: its outcome, or a place in line to wait in before
/// deciding again (taken under the store's lock, so that what it waits for cannot slip past).
enum Waitable<Value: Sendable>: Sendable {
    case ready(Value)
    case wait(Waiters.Ticket)
}

/// The sequences a worker holds, and every decision about them: a value type with no I/O, clock or
/// threads. `SequenceStore` keeps it behind a lock; tensor work happens outside it (a decode step
/// takes the cache out and gives it back), so each decision is short.
struct WorkerState: Sendable {
    private var sequences: [UInt64: HeldSequence] = [:]

    /// Takes a shard assignment: a new sequence, or a newer epoch of a held one (a failover may
    /// change the roles). Returns the statistics to send the coordinator again: those of a copy not
    /// yet compressed whose epoch moved, stamped with the new epoch, since the coordinator refuses
    /// statistics of an older one.
    mutating func assign(_ sequenceID: UInt64, _ held: HeldSequence) throws(WireError) -> [Tessera_V1_LayerStats] {
        guard let existing = sequences[sequenceID] else {
            sequences[sequenceID] = held
            return []
        }
        guard existing.tenant == held.tenant, existing.shardID == held.shardID else {
            throw WireError(.badRequest, "sequence \(sequenceID) already holds shard \(existing.shardID) here")
        }
        guard held.epoch >= existing.epoch else { return [] }
        sequences[sequenceID]!.isPrimary = held.isPrimary
        sequences[sequenceID]!.replicas = held.replicas
        sequences[sequenceID]!.assignment = held.assignment
        sequences[sequenceID]!.epoch = held.epoch
        return held.epoch == existing.epoch || existing.isCompressed ? [] : sequences[sequenceID]!.currentStatistics
    }

    /// The sequence if `tenant` owns it and the write carries the current shard and epoch, and comes
    /// from a client to the primary or, `forwarded`, from the primary to a replica.
    /// The held sequence a write may go to: the tenant, shard, epoch and role must match, and a
    /// forwarded write (`forwardedBy` is the sending worker's node id) must come from the shard's primary.
    func checked(
        _ sequenceID: UInt64,
        tenant: String,
        shardID: UInt32,
        epoch: UInt64,
        forwardedBy: String? = nil
    ) throws(WireError) -> HeldSequence {
        let forwarded = forwardedBy != nil
        guard let held = sequences[sequenceID] else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not held by this worker")
        }
        guard held.tenant == tenant else {
            throw WireError(.wrongTenant, "sequence \(sequenceID) belongs to another tenant")
        }
        guard held.shardID == shardID else {
            throw WireError(
                .notPrimary,
                "this worker holds shard \(held.shardID) of sequence \(sequenceID), not \(shardID)"
            )
        }
        guard held.epoch == epoch else {
            throw WireError(.staleEpoch, "sequence \(sequenceID) is at epoch \(held.epoch), the write carries \(epoch)")
        }
        guard held.isPrimary != forwarded else {
            throw WireError(
                .notPrimary,
                forwarded
                    ? "this worker is the primary of shard \(shardID) of sequence \(sequenceID); it takes no forwarded writes"
                    : "this worker holds a replica of shard \(shardID) of sequence \(sequenceID); write to its primary"
            )
        }
        if let forwardedBy, forwardedBy != held.assignment.shard.primary.nodeID {
            throw WireError(
                .permissionDenied,
                "\(forwardedBy) is not the primary of shard \(shardID) of sequence \(sequenceID); only the primary forwards writes"
            )
        }
        return held.withoutTensors
    }

    /// Marks the prefill of `layers` as being expanded (`HeldSequence.Activity.expanding`); parts
    /// with other layers may be expanding at the same time. Returns the bytes held instead when those
    /// layers are already here: a prefill (or a part of one) retried after a failover (the replica got
    /// it from the old primary) is acknowledged, not applied twice.
    mutating func beginExpansion(_ sequenceID: UInt64, layers sent: Set<Int>) throws(WireError) -> Int? {
        guard let held = sequences[sequenceID] else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not held by this worker")
        }
        let expanding = held.expandingLayers
        if !expanding.isDisjoint(with: sent) {
            throw WireError(
                .unavailable,
                "layers \(sent.intersection(expanding).sorted()) of sequence \(sequenceID) are still being expanded; retry",
                retryAfter: .milliseconds(200)
            )
        }
        if !held.prefills.isEmpty || held.isCompressed { return held.bytes.total }
        let already = sent.intersection(held.parts.prefills.keys)
        if !already.isEmpty {
            guard already == sent else {
                throw WireError(
                    .badRequest,
                    "layers \(already.sorted()) of sequence \(sequenceID) were already prefilled by an earlier part"
                )
            }
            return held.bytes.total
        }
        sequences[sequenceID]!.activity = .expanding(expanding.union(sent))
        return nil
    }

    /// Ends the expansion of `layers` without keeping them.
    mutating func abandonExpansion(_ sequenceID: UInt64, layers: Set<Int>) {
        sequences[sequenceID]?.finishExpanding(layers)
    }

    /// Keeps an expanded prefill, or a part of one. Once every layer of the shard is here the copy
    /// is prefilled: returns the bytes it holds and its statistics, stamped with the sequence's epoch
    /// now (a failover during the expansion moved it); before that, the bytes and no statistics.
    mutating func storePrefill(
        _ sequenceID: UInt64,
        _ part: PrefillParts,
        syntheticDecode: [Int: [DecodeStepInput]]?,
        needle: Needle?,
        audited: Bool
    ) throws(WireError) -> (bytes: Int, statistics: [Tessera_V1_LayerStats]) {
        guard sequences[sequenceID] != nil else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) was closed during its prefill")
        }
        guard sequences[sequenceID]!.prefills.isEmpty, sequences[sequenceID]!.cache == nil else {
            throw WireError(.badRequest, "sequence \(sequenceID) was already prefilled")
        }
        sequences[sequenceID]!.finishExpanding(Set(part.prefills.keys))
        sequences[sequenceID]!.parts.add(part)
        let held = sequences[sequenceID]!
        guard held.parts.prefills.count == held.layers.count else { return (held.bytes.total, []) }
        sequences[sequenceID]!.parts = PrefillParts()
        sequences[sequenceID]!.prefills = held.parts.prefills
        sequences[sequenceID]!.profiles = held.parts.profiles
        sequences[sequenceID]!.statistics = held.parts.statistics.sorted { $0.layer < $1.layer }
        sequences[sequenceID]!.work = held.parts.work
        sequences[sequenceID]!.syntheticDecode = syntheticDecode
        sequences[sequenceID]!.needle = needle
        sequences[sequenceID]!.audited = audited
        sequences[sequenceID]!.prefillWaiters.resumeAll()
        return (sequences[sequenceID]!.bytes.total, sequences[sequenceID]!.currentStatistics)
    }

    /// The prefill, for compressing outside the lock. A budget can arrive before this copy's prefill
    /// is stored (another copy's statistics completed the set first): it waits for the prefill.
    /// Returns the sequence with its prefill, or, once compressed, without tensors and `compressed`.
    func prefillForCompression(
        _ sequenceID: UInt64
    ) throws(WireError) -> Waitable<(held: HeldSequence, compressed: Bool)> {
        guard let held = sequences[sequenceID] else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not held by this worker")
        }
        if !held.isCompressed, held.prefills.isEmpty { return .wait(held.prefillWaiters.ticket()) }
        return .ready(held.isCompressed ? (held.withoutTensors, true) : (held, false))
    }

    /// Keeps the compressed cache (once; a repeated budget changes nothing) and drops the prefill.
    mutating func storeCache(
        _ sequenceID: UInt64,
        _ cache: ShardCache,
        rowScores: [Int: [[Float]]],
        audit: AuditCopy?,
        compressMicros: UInt64
    ) -> CompressedFootprint? {
        guard sequences[sequenceID] != nil else { return nil }
        if sequences[sequenceID]!.cache == nil {
            sequences[sequenceID]!.cache = cache
            sequences[sequenceID]!.headRowShares = cache.headRowShares(
                promptLength: sequences[sequenceID]!.layout.promptLength
            )
            sequences[sequenceID]!.work.compressMicros = compressMicros
            sequences[sequenceID]!.rowScores = rowScores
            sequences[sequenceID]!.audit = audit
            sequences[sequenceID]!.prefills = [:]
            sequences[sequenceID]!.profiles = [:]
        }
        sequences[sequenceID]!.compressedWaiters.resumeAll()
        return CompressedFootprint(sequences[sequenceID]!)
    }

    /// Cuts an already compressed cache to tighter budgets (memory pressure), once no decode step or
    /// copy has it; returns the bytes held. The cut runs under the lock: it is rare, and only moves
    /// the rows kept within their arrays.
    mutating func tighten(_ sequenceID: UInt64, to budgets: [Int: LayerBudget]) -> Waitable<CompressedFootprint?> {
        if let busy = sequences[sequenceID], busy.activity.holdsCache { return .wait(busy.idleWaiters.ticket()) }
        guard var held = sequences[sequenceID], held.cache != nil else { return .ready(nil) }
        sequences[sequenceID]!.cache = nil
        held.rowScores = held.cache!.tighten(
            to: budgets,
            scores: held.rowScores,
            promptLength: held.layout.promptLength
        )
        held.headRowShares = held.cache!.headRowShares(promptLength: held.layout.promptLength)
        sequences[sequenceID] = held
        return .ready(CompressedFootprint(held))
    }

    /// Whether the sequence's cache is compressed (the coordinator's budget has arrived); if not, a
    /// place in line until it is.
    func compressed(_ sequenceID: UInt64) throws(WireError) -> Waitable<Void> {
        guard let held = sequences[sequenceID] else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not held by this worker")
        }
        return held.isCompressed ? .ready(()) : .wait(held.compressedWaiters.ticket())
    }

    /// Starts one decode step: a retry of the last step gets its result again; otherwise the step's
    /// inputs are checked (a refused step changes nothing) and the cache moves into the returned job,
    /// to run outside the lock. `finishDecode` puts it back. With `primaryResult` (a replica, given
    /// the step its primary attended) the job only appends the step's rows and keeps that result.
    mutating func beginDecode(
        _ sequenceID: UInt64,
        step: Int,
        inputs: [Int: DecodeStepInput]?,
        primaryResult: Tessera_V1_DecodeResult? = nil,
        threads: ThreadTeam
    ) throws(WireError) -> DecodeStart {
        guard let held = sequences[sequenceID], held.isCompressed else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not held or not compressed")
        }
        if let last = held.lastResult, last.step == step { return .replay(last.body, replicas: held.replicas) }
        // Admission charged the rows of the decode tokens the client declared, no more.
        let declared = Int(held.assignment.decodeTokens)
        guard declared == 0 || step < declared else {
            throw WireError(
                .resourceExhausted,
                "sequence \(sequenceID) was admitted for \(declared) decode steps (open_sequence.decode_tokens); "
                    + "step \(step) would hold rows the memory limit does not count"
            )
        }
        if case .transferring = held.activity {
            throw WireError(
                .unavailable,
                "shard \(held.shardID) of sequence \(sequenceID) is being copied to a new replica; retry",
                retryAfter: .milliseconds(20)
            )
        }
        if case .decoding = held.activity {
            throw WireError(
                .unavailable,
                "decode step \(held.nextStep) of sequence \(sequenceID) is still running; retry",
                retryAfter: .milliseconds(10)
            )
        }
        guard step == held.nextStep else {
            throw WireError(
                .badRequest,
                "decode step \(step) of sequence \(sequenceID) is out of order; expected \(held.nextStep)"
            )
        }
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
                        + "synthetic step to expand"
                )
            }
        }
        // A step alone on the worker splits its heads across `threads` (every core); with others
        // running, each keeps to one thread.
        let alone = !sequences.values.contains { $0.decoding != nil }
        let bytes = held.bytes
        sequences[sequenceID]!.activity = .decoding(
            total: bytes.total,
            byModality: bytes.byModality,
            audit: held.auditBytes
        )
        sequences[sequenceID]!.cache = nil
        sequences[sequenceID]!.audit = nil
        return .run(
            DecodeJob(
                sequenceID: sequenceID,
                step: step,
                held: held,
                inputs: stepInputs,
                primaryResult: primaryResult,
                threads: alone ? threads : .single
            )
        )
    }

    /// Puts the job's cache back and, if it succeeded, records the step (unless the sequence was
    /// closed meanwhile).
    mutating func finishDecode(_ job: DecodeJob, result: Tessera_V1_DecodeResult?) {
        // Moved out of the job, not copied: the compute thread that ran it may keep the job object
        // alive until its next work item, and a second reference would make the next step's appends
        // copy every row.
        let cache = job.held.cache.take()
        let audit = job.held.audit.take()
        guard sequences[job.sequenceID] != nil else { return }
        sequences[job.sequenceID]!.cache = cache
        sequences[job.sequenceID]!.audit = audit
        sequences[job.sequenceID]!.activity = .idle
        if let result {
            sequences[job.sequenceID]!.nextStep = job.step + 1
            sequences[job.sequenceID]!.lastResult = (job.step, result)
        }
        sequences[job.sequenceID]!.idleWaiters.resumeAll()
    }

    // MARK: Re-replication

    private var incoming: [UInt64: IncomingShard] = [:]

    /// Starts copying a shard this worker is the primary of: waits for a running decode step to end,
    /// then holds further steps back until `endTransfer`. Returns the shard with its cache.
    mutating func beginTransfer(
        _ sequenceID: UInt64,
        shardID: UInt32,
        epoch: UInt64
    ) throws(WireError) -> Waitable<HeldSequence> {
        if let busy = sequences[sequenceID], busy.activity.holdsCache { return .wait(busy.idleWaiters.ticket()) }
        guard let held = sequences[sequenceID], held.shardID == shardID else {
            throw WireError(.unknownSequence, "shard \(shardID) of sequence \(sequenceID) is not held by this worker")
        }
        guard held.isPrimary, held.epoch == epoch else {
            throw WireError(
                .staleEpoch,
                "only the primary at epoch \(epoch) copies shard \(shardID) of sequence \(sequenceID); this copy is "
                    + "\(held.isPrimary ? "primary" : "a replica") at epoch \(held.epoch)"
            )
        }
        guard held.cache != nil else {
            throw WireError(
                .unavailable,
                "sequence \(sequenceID) is not compressed yet; copy it once its budget applied",
                retryAfter: .milliseconds(200)
            )
        }
        sequences[sequenceID]!.activity = .transferring
        return .ready(held)
    }

    /// Ends a copy; with `target`, the copy is installed there and every later write is forwarded to it.
    mutating func endTransfer(_ sequenceID: UInt64, adding target: Tessera_V1_Endpoint?) {
        guard sequences[sequenceID] != nil else { return }
        sequences[sequenceID]!.activity = .idle
        if let target, !sequences[sequenceID]!.assignment.shard.replicas.contains(where: { $0.nodeID == target.nodeID })
        {
            sequences[sequenceID]!.replicas.append(NodeAddress(host: target.host, port: Int(target.port)))
            sequences[sequenceID]!.assignment.shard.replicas.append(target)
        }
        sequences[sequenceID]!.idleWaiters.resumeAll()
    }

    /// Takes one part of a copy sent by a shard's primary; at the commit the copy becomes a replica.
    /// Returns the installed copy's digest at the commit. A layer part is converted here, under the
    /// lock; the worker converts it on its compute threads first (`incomingFormat`, then
    /// `receive(_:sequenceID:from:)`).
    mutating func receive(_ transfer: Tessera_V1_ShardTransfer, from sender: String) throws(WireError) -> UInt64? {
        let id = transfer.sequenceID
        switch transfer.part {
        case .begin(let begin):
            try checkSender(of: id, sender)
            if let held = sequences[id] {
                throw WireError(
                    .badRequest,
                    "sequence \(id) already has shard \(held.shardID) here; a copy goes elsewhere"
                )
            }
            incoming[id] = try IncomingShard(begin, sequenceID: id, from: sender)
            return nil
        case .layer(let state):
            try receive(incomingFormat(id, from: sender).layer(state), sequenceID: id, from: sender)
            return nil
        case .commit(let commit):
            try checkSender(of: id, sender)
            guard let shard = incoming.removeValue(forKey: id) else {
                throw WireError(.badRequest, "shard_transfer.commit of sequence \(id) without a transfer in progress")
            }
            let copy = try shard.finish(commit)
            guard sequences[id] == nil else {
                throw WireError(.badRequest, "sequence \(id) got another shard here during the copy")
            }
            sequences[id] = copy
            return copy.cache?.digest
        case nil:
            throw WireError(.badRequest, "shard_transfer needs a part: begin, layer or commit")
        }
    }

    /// What a layer of the copy in progress from `sender` is converted for.
    func incomingFormat(_ sequenceID: UInt64, from sender: String) throws(WireError) -> IncomingFormat {
        try checkSender(of: sequenceID, sender)
        guard let shard = incoming[sequenceID] else {
            throw WireError(.badRequest, "shard_transfer.layer of sequence \(sequenceID) before its begin")
        }
        return shard.format
    }

    /// Takes a layer of the copy in progress, converted already.
    mutating func receive(_ layer: IncomingLayer, sequenceID: UInt64, from sender: String) throws(WireError) {
        _ = try incomingFormat(sequenceID, from: sender)
        do {
            try incoming[sequenceID]!.take(layer)
        } catch {
            incoming[sequenceID] = nil
            throw error
        }
    }

    /// Every part of a copy comes from the worker that began it.
    private func checkSender(of sequenceID: UInt64, _ sender: String) throws(WireError) {
        if let incoming = incoming[sequenceID], incoming.sender != sender {
            throw WireError(
                .permissionDenied,
                "the copy of sequence \(sequenceID) in progress comes from another worker"
            )
        }
    }

    /// Drops every sequence (and copy in progress): the coordinator declared this incarnation dead and
    /// failed its shards over, so what it holds is stale. Returns how many were dropped.
    mutating func dropAll() -> Int {
        let ids = sequences.keys.sorted()
        for id in ids { _ = close(id) }
        incoming = [:]
        return ids.count
    }

    /// The layer statistics of every held shard, sent again after registering.
    func layerStatistics() -> [Tessera_V1_LayerStats] {
        sequences.keys.sorted().flatMap { sequences[$0]!.currentStatistics }
    }

    /// Every held shard as reported when (re-)registering with the coordinator.
    func heldShards() -> [Tessera_V1_HeldShard] {
        sequences.sorted { $0.key < $1.key }.map { _, held in
            var shard = Tessera_V1_HeldShard()
            shard.assignment = held.assignment
            shard.assignment.epoch = held.epoch
            shard.compressed = held.isCompressed
            shard.kvBytes = UInt64(held.bytes.total)
            return shard
        }
    }

    /// Sequences dropped because they were closed, with the epoch of the copy, oldest first; reported
    /// when registering (see `Tessera_V1_RegisterWorker.closedSequences`).
    private(set) var closedSequences: [Tessera_V1_ClosedSequence] = []
    /// How many `closedSequences` are kept.
    static let closedSequencesKept = 1024

    /// Drops a closed sequence's copy, remembering that it was closed; returns the bytes it held.
    mutating func closeSequence(_ sequenceID: UInt64) -> Int {
        if let held = sequences[sequenceID] {
            var record = Tessera_V1_ClosedSequence()
            record.sequenceID = sequenceID
            record.epoch = held.epoch
            closedSequences.append(record)
            if closedSequences.count > Self.closedSequencesKept { closedSequences.removeFirst() }
        }
        return close(sequenceID)
    }

    /// Drops the sequence's copy and returns the bytes it held; with `through`, only a copy at that
    /// epoch or older (a newer copy is kept, and 0 returned).
    mutating func close(_ sequenceID: UInt64, through epoch: UInt64? = nil) -> Int {
        if let epoch, let held = sequences[sequenceID], held.epoch > epoch { return 0 }
        guard let held = sequences.removeValue(forKey: sequenceID) else { return 0 }
        for waiters in [held.compressedWaiters, held.prefillWaiters, held.idleWaiters] {
            waiters.failAll(WireError(.unknownSequence, "sequence \(sequenceID) was closed"))
        }
        return held.bytes.total
    }

    /// Bytes held over every sequence, in all and by modality, the audit copies' bytes, and the
    /// number of sequences.
    func totals() -> (total: Int, byModality: ModalityBytes, audit: Int, sequences: Int) {
        var total = 0
        var audit = 0
        var byModality = ModalityBytes()
        for held in sequences.values {
            let bytes = held.bytes
            total += bytes.total
            audit += held.auditBytes
            byModality += bytes.byModality
        }
        return (total, byModality, audit, sequences.count)
    }

    /// K/V bytes held, in all (without the walk over row tags that `totals` makes).
    func kvBytes() -> Int {
        sequences.values.reduce(0) { $0 + $1.totalBytes }
    }

    /// K/V and audit bytes held, in all: what the process's memory is compared with.
    func heldBytes() -> Int {
        sequences.values.reduce(0) { $0 + $1.totalBytes + $1.auditBytes }
    }

    /// The ids of the sequences held (any shard, primary or replica).
    var sequenceIDs: [UInt64] { sequences.keys.sorted() }

    /// How many of the held copies are primaries, and how many replicas.
    func shardCounts() -> (primary: Int, replica: Int) {
        let primaries = sequences.values.count(where: \.isPrimary)
        return (primaries, sequences.count - primaries)
    }

    /// Every held shard with its role, bytes and digest (for comparing replicas).
    func sequenceStatuses(tenant: String?) -> [Tessera_V1_SequenceStatus] {
        sequences.filter { tenant == nil || $0.value.tenant == tenant }.sorted { $0.key < $1.key }.map { id, held in
            var status = Tessera_V1_SequenceStatus()
            status.tenant = held.tenant
            status.sequenceID = id
            status.state = held.isCompressed ? .decoding : .prefilling
            status.promptLength = UInt32(held.layout.promptLength)
            status.kvBytes = UInt64(held.bytes.total)
            status.shardID = held.shardID
            status.primary = held.isPrimary
            status.digest = held.cache?.digest ?? 0
            if let shares = held.headRowShares { status.headRowShares = shares.proto }
            return status
        }
    }
}

enum DecodeStart: Sendable {
    /// The step was the last one done: its result again (an idempotent retry), and the replicas to
    /// send the retry to.
    case replay(Tessera_V1_DecodeResult, replicas: [NodeAddress])
    case run(DecodeJob)
}

/// One decode step of one sequence with the cache it runs over, taken out of the store so that the
/// tensor work runs on the worker's compute threads. A class, so that the cache is never copied: the
/// job is handed from the store to one compute thread and back, never shared while it runs (hence
/// `@unchecked Sendable`).
final class DecodeJob: @unchecked Sendable {
    let sequenceID: UInt64
    let step: Int
    var held: HeldSequence
    let inputs: [(layer: Int, input: DecodeStepInput)]
    /// The result the primary sent with the step, on a replica: the job then appends the rows and
    /// answers with it, without attending.
    let primaryResult: Tessera_V1_DecodeResult?
    /// Threads the step's heads are split across.
    let threads: ThreadTeam

    init(
        sequenceID: UInt64,
        step: Int,
        held: HeldSequence,
        inputs: [(layer: Int, input: DecodeStepInput)],
        primaryResult: Tessera_V1_DecodeResult?,
        threads: ThreadTeam
    ) {
        self.sequenceID = sequenceID
        self.step = step
        self.held = held
        self.inputs = inputs
        self.primaryResult = primaryResult
        self.threads = threads
    }

    /// Appends the step to every layer and attends; audited sequences also score it. Given the
    /// primary's result, only appends (the audit copy too) and answers with that result.
    func run() throws(WireError) -> Tessera_V1_DecodeResult {
        // The cache is moved into locals for the step: mutating it through the class property could
        // leave a second reference alive, and then every append would copy the rows.
        guard var cache = held.cache.take() else {
            throw WireError(.internal, "decode of sequence \(sequenceID) has no cache")
        }
        var audit = held.audit.take()
        defer {
            held.cache = cache
            held.audit = audit
        }
        let geometry = held.geometry
        let position = held.layout.promptLength + step
        if let primaryResult {
            for (index, (layer, input)) in inputs.enumerated() {
                guard cache.append(layer: layer, geometry: geometry, input: input, position: position) else {
                    for (appended, _) in inputs[..<index] { cache.removeLastRow(layer: appended) }
                    throw WireError(.internal, "sequence \(sequenceID) holds no layer \(layer)")
                }
            }
            for (layer, input) in inputs {
                audit?.append(layer: layer, geometry: geometry, input: input, position: position)
            }
            return primaryResult
        }
        var result = Tessera_V1_DecodeResult()
        result.sequenceID = sequenceID
        result.shardID = held.shardID
        result.step = UInt32(step)
        var fidelity = FidelityReport()
        // Every layer runs before anything else is recorded, so that a refused step leaves the cache
        // as it was: finite but huge inputs can overflow attention, and their rows must not stay.
        guard let outputs = cache.decode(inputs, geometry: geometry, position: position, threads: threads) else {
            let missing = inputs.map(\.layer).filter { !cache.holds(layer: $0) }
            throw WireError(.internal, "sequence \(sequenceID) holds no layer \(missing)")
        }
        if let bad = outputs.firstIndex(where: { !$0.allSatisfy(\.isFinite) }) {
            for (layer, _) in inputs { cache.removeLastRow(layer: layer) }
            throw WireError(
                .invalidValue,
                "step \(step) of sequence \(sequenceID): layer \(inputs[bad].layer)'s attention output is not finite "
                    + "(inputs too large); the step was not applied"
            )
        }
        for ((layer, input), outputs) in zip(inputs, outputs) {
            audit?.score(
                layer: layer,
                step: step,
                geometry: geometry,
                input: input,
                position: position,
                outputs: outputs,
                into: &fidelity
            )
            result.outputs.append(try Tessera_V1_LayerOutput(layer: layer, output: outputs, geometry: geometry))
        }
        result.kvBytes = UInt64(cache.totalBytes)
        held.work.record(in: &result)
        if let shares = held.headRowShares { result.headRowShares = shares.proto }
        result.fullKvBytes = UInt64(held.fullBytes(rows: position + 1, storage: cache.storage))
        if audit != nil {
            result.audit.relativeErrorSum = fidelity.relativeErrorSum
            result.audit.outputs = UInt32(fidelity.outputs)
            result.audit.needleProbes = UInt32(fidelity.needleProbes)
            result.audit.needleCorrect = UInt32(fidelity.needleCorrect)
        }
        return result
    }
}

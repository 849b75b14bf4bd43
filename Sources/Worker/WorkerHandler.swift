import ClusterAdmin
import ClusterTransport
import ClusterWire
import KVCacheCore
import Metrics
import NIOCore
import Workloads

/// Answers the requests that reach a worker: shard assignments, budgets, copies and closes from the
/// coordinator; prefill and decode from clients of the sequence's tenant and, forwarded, from the
/// shard's primary; shard copies from the primary; status from anyone (a client sees only its
/// tenant's sequences). Who sent a request is the peer's certified identity; a request its role may
/// not send is refused with PERMISSION_DENIED before anything is read or changed.
struct WorkerHandler: EnvelopeHandler {
    let worker: WorkerService

    func handle(
        _ request: Tessera_V1_Envelope,
        from connection: PeerConnection
    ) async throws
        -> Tessera_V1_Envelope.OneOf_Body?
    {
        let peer = connection.peer
        switch request.body {
        case .shardAssignment(let assignment):
            try peer.require(.coordinator, for: request)
            return try await assign(assignment)
        case .assignBudget(let budget):
            try peer.require(.coordinator, for: request)
            let applied = try await apply(budget)
            await worker.releaseRetainedPages()
            return applied
        case .close(let close):
            try peer.require(.coordinator, for: request)
            return try await self.close(close)
        case .copyShard(let copy):
            try peer.require(.coordinator, for: request)
            return try await self.copy(copy)
        case .prefill(var prefill):
            try peer.require([.client, .worker], for: request)
            prefill.tenant = try peer.tenant(claimed: prefill.tenant)
            return try await self.prefill(prefill, forwardedBy: peer.role == .worker ? peer.nodeID : nil)
        case .decode(var decode):
            try peer.require([.client, .worker], for: request)
            decode.tenant = try peer.tenant(claimed: decode.tenant)
            return try await self.decode(decode, forwardedBy: peer.role == .worker ? peer.nodeID : nil)
        case .shardTransfer(let part):
            try peer.require(.worker, for: request)
            var ack = Tessera_V1_ShardTransferAck()
            ack.sequenceID = part.sequenceID
            ack.digest = try await receive(part, from: peer.nodeID) ?? 0
            return .shardTransferAck(ack)
        case .statusRequest(let request):
            // Insecure clients have no certified tenant and see everything, as insecure mode trusts all.
            return await status(request, tenant: peer.role == .client ? peer.tenant : nil)
        default:
            throw WireError(.badRequest, "a worker does not accept \(request.bodyName)")
        }
    }

    private func assign(_ message: Tessera_V1_ShardAssignment) async throws -> Tessera_V1_Envelope.OneOf_Body {
        let held = try HeldSequence(assignment: message, localNodeID: worker.configuration.nodeID)
        worker.report(try worker.store.withLock { try $0.assign(message.sequenceID, held) })
        var ack = Tessera_V1_ShardAssignmentAck()
        ack.sequenceID = message.sequenceID
        ack.shardID = message.shard.shardID
        return .shardAssignmentAck(ack)
    }

    /// Takes the shard's prefill (inline tensors or a workload seed to expand), computes each layer's
    /// attention profile and statistics, and queues the statistics for the coordinator.
    private func prefill(
        _ message: Tessera_V1_Prefill,
        forwardedBy: String?
    ) async throws -> Tessera_V1_Envelope.OneOf_Body {
        let held = try worker.store.withLock {
            try $0.checked(
                message.sequenceID,
                tenant: message.tenant,
                shardID: message.shardID,
                epoch: message.epoch,
                forwardedBy: forwardedBy
            )
        }
        // Replicas expand the same prefill at the same time; the client's ack waits for all of them.
        async let replicated: Void = worker.replicate(.prefill(message), to: held.replicas)
        let layers = Self.layersSent(message, held)
        if let bytes = try worker.store.withLock({ try $0.beginExpansion(message.sequenceID, layers: layers) }) {
            try await replicated
            return .prefillAck(Self.prefillAck(message, epoch: held.epoch, bytes: bytes))
        }
        let expanded: (part: PrefillParts, syntheticDecode: [Int: [DecodeStepInput]]?, needle: Needle?)
        do {
            let clock = worker.network.clock
            if Self.isSmall(message, held) {
                expanded = try Self.expand(message, held, threads: .single, clock: clock)
            } else {
                let threads = worker.team(.prefill)
                expanded = try await worker.offload(.prefill) {
                    try Self.expand(message, held, threads: threads, clock: clock)
                }
            }
        } catch {
            worker.store.withLock { $0.abandonExpansion(message.sequenceID, layers: layers) }
            throw error
        }
        if expanded.part.work.profileMicros > 0 {
            worker.metrics.timer(TesseraMetrics.profileDurationSeconds, dimensions: [("policy", held.policy.name)])
                .recordMicroseconds(expanded.part.work.profileMicros)
        }
        let (bytes, current) = try worker.store.withLock {
            try $0.storePrefill(
                message.sequenceID,
                expanded.part,
                syntheticDecode: expanded.syntheticDecode,
                needle: expanded.needle,
                audited: message.audit
            )
        }
        // Every copy reports its (identical) statistics, so a replica promoted before the primary
        // reported still gets the sequence its budget; the coordinator keeps one per layer. A part
        // of a prefill reports nothing: the statistics go once the last part completes the shard.
        worker.report(current)
        try await replicated
        return .prefillAck(Self.prefillAck(message, epoch: held.epoch, bytes: bytes))
    }

    /// Whether a prefill is taken where it arrived instead of on the prefill threads: inline tensors of
    /// at most 256 KiB whose attention profile is at most 2^20 multiply-adds. That is tens of
    /// microseconds of work, less than the hop to a prefill thread and back, and too little to hold
    /// up a decode step or a heartbeat.
    static func isSmall(_ message: Tessera_V1_Prefill, _ held: HeldSequence) -> Bool {
        guard case .inlineTensors(let tensors) = message.source else { return false }
        let bytes = tensors.layers.reduce(0) { $0 + $1.keys.data.count + $1.values.data.count + $1.queries.data.count }
        let m = held.layout.promptLength
        let observedRows = m - (held.policy.requirements(layout: held.layout).firstRow ?? m)
        let multiplyAdds =
            Double(observedRows) * Double(m) * Double(held.geometry.headDim * held.geometry.queryHeads)
            * Double(tensors.layers.count)
        return bytes <= 256 << 10 && multiplyAdds <= Double(1 << 20)
    }

    /// The layers a prefill carries: those of an inline part, or every layer of the shard.
    private static func layersSent(_ message: Tessera_V1_Prefill, _ held: HeldSequence) -> Set<Int> {
        guard case .inlineTensors(let tensors) = message.source else { return Set(held.layers) }
        return Set(tensors.layers.map { Int($0.layer) })
    }

    private static func prefillAck(_ message: Tessera_V1_Prefill, epoch: UInt64, bytes: Int) -> Tessera_V1_PrefillAck {
        var ack = Tessera_V1_PrefillAck()
        ack.sequenceID = message.sequenceID
        ack.shardID = message.shardID
        ack.epoch = epoch
        ack.kvBytes = UInt64(bytes)
        return ack
    }

    /// The shard's prefill tensors (given inline, all of its layers or a part's, or expanded from a
    /// workload seed), their attention profiles and the statistics the coordinator allocates budgets from. CPU-heavy: runs on the
    /// worker's compute threads, each profile split across `threads`.
    private static func expand(
        _ message: Tessera_V1_Prefill,
        _ held: HeldSequence,
        threads: ThreadTeam,
        clock: any Clock<Duration>
    ) throws -> (part: PrefillParts, syntheticDecode: [Int: [DecodeStepInput]]?, needle: Needle?) {
        let m = held.layout.promptLength
        var part = PrefillParts()
        var syntheticDecode: [Int: [DecodeStepInput]]?
        var needle: Needle?
        let requirements = held.policy.requirements(layout: held.layout)
        /// Profiles one layer and keeps its K/V; the query rows are dropped at once (they are only
        /// needed for the profile, and can outweigh the keys several times).
        func take(_ layer: Int, _ prefill: LayerPrefill) throws {
            do {
                let profile = try PrefillWork.timed(&part.work.profileMicros, on: clock) { () throws(KVCacheError) in
                    try AttentionProfile(prefill: prefill, requirements: requirements, threads: threads)
                }
                part.profiles[layer] = profile
                let stats = LayerStatistics(layer: layer, profile: profile, layout: held.layout, policy: held.policy)
                part.statistics.append(try stats.proto(sequenceID: message.sequenceID, epoch: held.epoch))
            } catch let error as KVCacheError {
                throw WireError(.invalidShape, "layer \(layer): \(error.message)")
            }
            part.prefills[layer] = prefill.withoutQueries()
        }
        switch message.source {
        case .synthetic(let source):
            let preset: WorkloadPreset
            do { preset = try WorkloadPreset.named(source.workload) } catch {
                throw WireError(.badRequest, "prefill.synthetic.workload: \(error.message)")
            }
            guard held.geometry.headDim >= 8 else {
                throw WireError(
                    .badRequest,
                    "synthetic workloads need headDim ≥ 8, the model has \(held.geometry.headDim)"
                )
            }
            let settings = source.hasShape ? try TraceSettings(shape: source.shape) : .defaults
            let trace = TraceGenerator(preset: preset, geometry: held.geometry, settings: settings, seed: source.seed)
                .sequence(Int(source.sequenceIndex))
            needle = trace.needle
            guard trace.layout == held.layout else {
                throw WireError(
                    .invalidShape,
                    "the synthetic sequence has a different modality layout (\(trace.layout.promptLength) "
                        + "positions) than the one the sequence was opened with (\(m))"
                )
            }
            var decode: [Int: [DecodeStepInput]] = [:]
            for layer in held.layers {
                // Only the query rows the policy observes are synthesised.
                let generated = PrefillWork.timed(&part.work.synthesisMicros, on: clock) {
                    trace.layerTrace(layer, firstQueryRow: requirements.firstRow ?? m)
                }
                try take(layer, generated.prefill)
                decode[layer] = generated.decode
            }
            syntheticDecode = decode
        case .inlineTensors(let tensors):
            // Every layer of the shard, or some of them: a part of a prefill sent in several.
            guard !tensors.layers.isEmpty else {
                throw WireError(
                    .badRequest,
                    "an inline prefill must carry at least one layer of the shard \(held.layers)"
                )
            }
            var given: [Int: LayerPrefill] = [:]
            for layer in tensors.layers {
                let index = Int(layer.layer)
                guard held.layers.contains(index) else {
                    throw WireError(.badRequest, "layer \(index) is not in this shard (\(held.layers))")
                }
                guard given[index] == nil else {
                    throw WireError(.badRequest, "layer \(index) appears twice in one prefill")
                }
                given[index] = try LayerPrefill(
                    proto: layer,
                    geometry: held.geometry,
                    promptLength: m,
                    spareRows: Int(held.assignment.decodeTokens)
                )
            }
            for layer in given.keys.sorted() { try take(layer, given.removeValue(forKey: layer)!) }
        case nil:
            throw WireError(.badRequest, "prefill needs a source: inline_tensors or synthetic")
        }
        return (part, syntheticDecode, needle)
    }

    /// Compresses the shard's layers to the coordinator's budgets; a later, tighter budget (memory
    /// pressure) cuts the compressed cache further.
    private func apply(_ message: Tessera_V1_AssignBudget) async throws -> Tessera_V1_Envelope.OneOf_Body {
        let (held, compressed) = try await withDeadline(
            .seconds(60),
            on: worker.network.clock,
            what: "waiting for the prefill of sequence \(message.sequenceID)"
        ) {
            try await self.worker.store.waiting { try $0.prefillForCompression(message.sequenceID) }
        }
        // A budget from before a failover: the coordinator sends it again at the new epoch.
        guard message.epoch >= held.epoch else {
            throw WireError(
                .staleEpoch,
                "sequence \(message.sequenceID) is at epoch \(held.epoch), the budget carries \(message.epoch)"
            )
        }
        let budgets = try [LayerBudget](proto: message, geometry: held.geometry)
        var byLayer: [Int: LayerBudget] = [:]
        for budget in budgets where held.layers.contains(budget.layer) { byLayer[budget.layer] = budget }
        let stored: CompressedFootprint?
        if compressed {
            stored = try await worker.store.waiting { $0.tighten(message.sequenceID, to: byLayer) }
        } else {
            let storage = worker.configuration.storage
            let budgets = byLayer
            let clock = worker.network.clock
            let (cache, audit, scores, micros) = try await worker.offload(.prefill) {
                try Self.compress(held, budgets: budgets, storage: storage, clock: clock)
            }
            stored = worker.store.withLock {
                $0.storeCache(message.sequenceID, cache, rowScores: scores, audit: audit, compressMicros: micros)
            }
            if let stored {
                let policy = [("policy", held.policy.name)]
                worker.metrics.timer(TesseraMetrics.compressDurationSeconds, dimensions: policy)
                    .recordMicroseconds(micros)
                worker.metrics.counter(TesseraMetrics.compressionInputBytesTotal, dimensions: policy)
                    .increment(by: held.fullBytes(rows: held.layout.promptLength))
                worker.metrics.counter(TesseraMetrics.compressionOutputBytesTotal, dimensions: policy)
                    .increment(by: stored.total)
            }
        }
        guard let bytes = stored else {
            throw WireError(.unknownSequence, "sequence \(message.sequenceID) was closed")
        }
        var applied = Tessera_V1_BudgetApplied()
        applied.sequenceID = message.sequenceID
        applied.shardID = held.shardID
        applied.epoch = held.epoch
        applied.kvBytes = UInt64(bytes.total)
        applied.kvBytesByModality = [Tessera_V1_ModalityBytes](byModality: bytes.byModality)
        if let shares = bytes.headRowShares { applied.headRowShares = shares.proto }
        return .budgetApplied(applied)
    }

    /// The compressed cache, the full copy of an audited sequence, the kept rows' scores, and the
    /// microseconds the compression took on `clock` (the audit copy is the load test's instrument,
    /// not the policy's cost, so it is not counted).
    private static func compress(
        _ held: HeldSequence,
        budgets byLayer: [Int: LayerBudget],
        storage: ScalarType,
        clock: some Clock<Duration>
    ) throws(WireError) -> (ShardCache, AuditCopy?, [Int: [[Float]]], UInt64) {
        let m = held.layout.promptLength
        let (cache, scores): (ShardCache, [Int: [[Float]]])
        var audit: AuditCopy?
        var micros: UInt64 = 0
        do {
            (cache, scores) = try PrefillWork.timed(&micros, on: clock) { () throws(KVCacheError) in
                let cache = try ShardCache.compress(
                    held.prefills,
                    profiles: held.profiles,
                    budgets: byLayer,
                    layout: held.layout,
                    policy: held.policy,
                    storage: storage,
                    decodeRows: Int(held.assignment.decodeTokens)
                )
                return (cache, cache.rowScores(profiles: held.profiles, policy: held.policy, layout: held.layout))
            }
            if held.audited {
                let cacheKeepsWholeHeads = held.policy == .full && storage == .float32
                let whole = [HeadBudget](repeating: HeadBudget(capacity: m), count: held.geometry.kvHeads)
                let full = try ShardCache.compressLayers(
                    held.prefills,
                    profiles: [:],
                    budgets: byLayer.mapValues { LayerBudget(layer: $0.layer, heads: whole) },
                    layout: held.layout,
                    policy: .full,
                    decodeRows: Int(held.assignment.decodeTokens),
                    // Not the arrays the cache took already: two caches sharing a head would copy it
                    // on its first decoded row, inside a decode step.
                    adoptWholeHeads: !cacheKeepsWholeHeads,
                    as: Float.self
                )
                audit = AuditCopy(full: full, needle: held.needle)
            }
        } catch {
            throw WireError(.invalidShape, "cannot apply the budget: \(error.message)")
        }
        return (cache, audit, scores, micros)
    }

    private func decode(
        _ message: Tessera_V1_Decode,
        forwardedBy: String?
    ) async throws -> Tessera_V1_Envelope.OneOf_Body {
        let held = try worker.store.withLock {
            try $0.checked(
                message.sequenceID,
                tenant: message.tenant,
                shardID: message.shardID,
                epoch: message.epoch,
                forwardedBy: forwardedBy
            )
        }
        try Self.checkPrimaryResult(of: message, forwardedBy: forwardedBy)
        var inputs: [Int: DecodeStepInput]?
        if !message.layers.isEmpty {
            var given: [Int: DecodeStepInput] = [:]
            for layer in message.layers {
                guard held.layers.contains(Int(layer.layer)) else {
                    throw WireError(.badRequest, "layer \(layer.layer) is not in this shard (\(held.layers))")
                }
                given[Int(layer.layer)] = try DecodeStepInput(proto: layer, geometry: held.geometry)
            }
            inputs = given
        }
        // Only a step that arrives before the sequence's budget waits (under a deadline, which costs
        // two tasks and a timer: not something every step should pay).
        if case .wait = try worker.store.withLock({ try $0.compressed(message.sequenceID) }) {
            try await withDeadline(
                .seconds(60),
                on: worker.network.clock,
                what: "waiting for the budget of sequence \(message.sequenceID)"
            ) {
                try await self.worker.store.waiting { try $0.compressed(message.sequenceID) }
            }
        }
        let primaryResult = message.hasPrimaryResult ? message.primaryResult : nil
        let kind: WorkerService.Work = held.audited ? .audit : .decode
        let threads = worker.team(kind)
        switch try worker.store.withLock({
            try $0.beginDecode(
                message.sequenceID,
                step: Int(message.step),
                inputs: inputs,
                primaryResult: primaryResult,
                threads: threads
            )
        }) {
        case .replay(let result, let replicas):
            try await replicate(message, result: result, to: replicas)
            return .decodeResult(result)
        case .run(let job):
            let result: Tessera_V1_DecodeResult
            do {
                // A replica's share of the step is a row appended per head: not worth a thread hop.
                if primaryResult == nil {
                    result = try await worker.offload(kind) { try job.run() }
                } else {
                    result = try job.run()
                }
            } catch {
                // The job goes back to the store exactly once, whatever fails; a refused step never
                // reaches the replicas.
                worker.store.withLock { $0.finishDecode(job, result: nil) }
                throw error
            }
            worker.store.withLock { $0.finishDecode(job, result: result) }
            let replicas = worker.configuration.weakened.contains(.replicateBeforeAck) ? [] : job.held.replicas
            try await replicate(message, result: result, to: replicas)
            return .decodeResult(result)
        }
    }

    /// Forwards an attended step to the replicas it began with (a copy that becomes a replica later
    /// is snapshotted after the step, so it already holds it), with its result: they append the rows
    /// and keep the result, so that a retry after a failover is answered the same, without attending
    /// themselves. The answer to the client waits for them.
    private func replicate(
        _ message: Tessera_V1_Decode,
        result: Tessera_V1_DecodeResult,
        to replicas: [NodeAddress]
    ) async throws {
        var forwarded = message
        forwarded.primaryResult = result
        try await worker.replicate(.decode(forwarded), to: replicas)
    }

    /// Only a primary forwarding a step sets `primary_result`, always, and for that very step.
    static func checkPrimaryResult(of message: Tessera_V1_Decode, forwardedBy: String?) throws(WireError) {
        guard let forwardedBy else {
            guard !message.hasPrimaryResult else {
                throw WireError(
                    .badRequest,
                    "decode.primary_result is set only by a shard's primary forwarding a step to its replicas"
                )
            }
            return
        }
        guard message.hasPrimaryResult else {
            throw WireError(.badRequest, "the decode step forwarded by \(forwardedBy) carries no primary_result")
        }
        let result = message.primaryResult
        guard result.sequenceID == message.sequenceID, result.shardID == message.shardID, result.step == message.step
        else {
            throw WireError(
                .badRequest,
                "the primary_result forwarded by \(forwardedBy) is for step \(result.step) of shard "
                    + "\(result.shardID) of sequence \(result.sequenceID), not step \(message.step) of shard "
                    + "\(message.shardID) of sequence \(message.sequenceID)"
            )
        }
    }

    /// Copies a shard this worker is the primary of to `message.target` (re-replication). Decode steps
    /// of the sequence wait (clients retry) from the snapshot until the target installed the copy and
    /// became a replica, so the copy misses no write.
    private func copy(_ message: Tessera_V1_CopyShard) async throws -> Tessera_V1_Envelope.OneOf_Body {
        let id = message.sequenceID
        let held = try await worker.store.waiting {
            try $0.beginTransfer(id, shardID: message.shardID, epoch: message.epoch)
        }
        let target = NodeAddress(host: message.target.host, port: Int(message.target.port))
        var ack = Tessera_V1_CopyShardAck()
        ack.sequenceID = id
        ack.shardID = message.shardID
        do {
            let copy = try await worker.offload(.prefill) { try OutgoingShard(held, sequenceID: id) }
            let (installed, transferred) = try await worker.send(copy, to: target)
            guard installed == copy.digest else {
                throw WireError(.internal, "\(target) installed digest \(installed), expected \(copy.digest)")
            }
            ack.digest = copy.digest
            ack.kvBytes = UInt64(held.bytes.total)
            ack.transferredBytes = transferred
        } catch {
            worker.store.withLock { $0.endTransfer(id, adding: nil) }
            throw error
        }
        worker.store.withLock { $0.endTransfer(id, adding: message.target) }
        return .copyShardAck(ack)
    }

    /// Takes a part of a shard copy; a layer's rows are checked and converted on the compute threads,
    /// so that several layers in flight convert at once and the store only keeps them.
    private func receive(_ part: Tessera_V1_ShardTransfer, from sender: String) async throws -> UInt64? {
        guard case .layer(let state) = part.part else {
            return try worker.store.withLock { try $0.receive(part, from: sender) }
        }
        let id = part.sequenceID
        let format = try worker.store.withLock { try $0.incomingFormat(id, from: sender) }
        let layer = try await worker.offload(.prefill) { try format.layer(state) }
        try worker.store.withLock { try $0.receive(layer, sequenceID: id, from: sender) }
        return nil
    }

    private func close(_ message: Tessera_V1_Close) async throws -> Tessera_V1_Envelope.OneOf_Body {
        var ack = Tessera_V1_CloseAck()
        ack.sequenceID = message.sequenceID
        // An epoch names a copy left behind, not a closed sequence.
        let freed =
            message.epoch == 0
            ? worker.store.withLock { $0.closeSequence(message.sequenceID) }
            : worker.store.withLock { $0.close(message.sequenceID, through: message.epoch) }
        ack.freedBytes = UInt64(freed)
        if ack.freedBytes > 0 { await worker.releaseRetainedPages() }
        return .closeAck(ack)
    }

    /// The worker's figures; with `include_sequences`, its sequences (only `tenant`'s when given).
    private func status(_ request: Tessera_V1_StatusRequest, tenant: String?) async -> Tessera_V1_Envelope.OneOf_Body {
        let totals = worker.store.withLock { $0.totals() }
        var me = Tessera_V1_WorkerStatus()
        me.endpoint.nodeID = worker.configuration.nodeID
        me.endpoint.host = worker.configuration.listen.host
        me.endpoint.port = UInt32(worker.port ?? 0)
        me.incarnation = worker.configuration.incarnation
        me.state = .up
        let shards = worker.store.withLock { $0.shardCounts() }
        me.primaryShards = UInt32(shards.primary)
        me.replicaShards = UInt32(shards.replica)
        me.kvBytes = UInt64(totals.total)
        me.kvBytesByModality = [Tessera_V1_ModalityBytes](byModality: totals.byModality)
        me.memoryCapacityBytes = worker.configuration.memoryCapacityBytes
        me.rssBytes = ProcessMemory.residentBytes()
        me.auditBytes = UInt64(totals.audit)
        me.liveSequences = UInt32(totals.sequences)
        var reply = Tessera_V1_StatusReply()
        reply.workers = [me]
        reply.sequenceCount = UInt32(totals.sequences)
        reply.totalKvBytes = UInt64(totals.total)
        if request.includeSequences { reply.sequences = worker.store.withLock { $0.sequenceStatuses(tenant: tenant) } }
        return .statusReply(reply)
    }
}

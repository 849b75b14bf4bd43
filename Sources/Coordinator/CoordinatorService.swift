import ClusterAdmin
import ClusterSecurity
import ClusterState
package import ClusterTransport
import ClusterWire
import KVCacheCore
public import Logging
import Metrics
import Synchronization
import Tracing

/// The coordinator process: membership and failure detection, admission and placement
/// of new sequences, and the gather-allocate-scatter of per-layer budgets: once every layer's
/// statistics of a sequence have arrived from the workers, it runs the policy's allocator and sends
/// each worker the budgets of its layers.
public final class CoordinatorService: Sendable {
    public let configuration: CoordinatorConfiguration
    let logger: Logger
    let state: Mutex<CoordinatorState<PeerConnection>>
    /// Where it listens, and the clock of its loops (TCP unless the simulator runs it).
    let network: any Network

    public convenience init(configuration: CoordinatorConfiguration, logger: Logger) throws {
        try self.init(
            configuration: configuration,
            logger: logger,
            network: TCPNetwork(
                security: configuration.security,
                maxFrameBytes: configuration.maxFrameBytes,
                faults: configuration.faults
            )
        )
    }

    package init(configuration: CoordinatorConfiguration, logger: Logger, network: any Network) throws {
        self.configuration = configuration
        self.network = network
        var logger = logger
        logger[metadataKey: "node.id"] = "\(configuration.nodeID)"
        logger[metadataKey: "node.role"] = "coordinator"
        self.logger = logger
        state = Mutex(try CoordinatorState(configuration: configuration, elapsed: network.elapsedTime()))
    }

    /// Serves until cancelled; `onReady` gets the bound port.
    public func run(onReady: @escaping @Sendable (Int) async -> Void = { _ in }) async throws {
        let identity = NodeIdentity(
            role: .coordinator,
            nodeID: configuration.nodeID,
            incarnation: configuration.incarnation
        )
        try configuration.security.check(local: identity)
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask {
                try await self.network.listen(
                    on: self.configuration.listen,
                    handshake: Handshake(local: identity, acceptedPeerRoles: [.worker, .client]),
                    handler: CoordinatorHandler(coordinator: self),
                    logger: self.logger,
                    onBound: onReady
                )
            }
            group.addTask { try await self.detectFailures() }
            group.addTask { try await self.restoreReplication() }
            group.addTask { try await self.retryAssignments() }
            group.addTask { try await self.retryCloses() }
        }
    }

    private func detectFailures() async throws {
        while true {
            try await network.clock.sleep(for: configuration.failureDetector.heartbeatInterval / 2)
            state.withLock { $0.gauges() }.record()
            let (changes, pause) = state.withLock { $0.tick() }
            if let pause {
                logger.warning(
                    "failure detector paused (this process was stopped or starved); silence not held against workers",
                    metadata: ["pause.millis": "\(Int(pause / .milliseconds(1)))"]
                )
            }
            for change in changes {
                Counter(label: TesseraMetrics.memberTransitionsTotal, dimensions: [("state", change.to.rawValue)])
                    .increment()
                logger.warning(
                    "membership changed",
                    metadata: [
                        "peer.id": "\(change.nodeID)", "from": "\(change.from.map(\.rawValue) ?? "-")",
                        "to": "\(change.to)",
                    ]
                )
            }
            var dead = Set(changes.filter { $0.to == .dead }.map(\.nodeID))
            // After a restart: holders that never re-registered died while the coordinator was down.
            dead.formUnion(state.withLock { $0.unregisteredHolders() })
            if !dead.isEmpty { await failOver(dead: dead) }
        }
    }

    /// Restores the replication factor: every heartbeat interval, copies under-replicated shards of
    /// compressed sequences from their primaries to workers that hold no shard of the sequence (a
    /// worker that rejoined, or the least loaded), a few at a time, while traffic continues.
    private func restoreReplication() async throws {
        while true {
            try await network.clock.sleep(for: configuration.failureDetector.heartbeatInterval)
            let plans = state.withLock { $0.replicationPlans(limit: 2) }
            await withDiscardingTaskGroup { group in
                for plan in plans { group.addTask { await self.copy(plan) } }
            }
        }
    }

    /// Sends again, every half heartbeat interval, the budgets that did not reach every copy (see
    /// `BudgetLifecycle`), once their backoff has passed.
    private func retryAssignments() async throws {
        while true {
            try await network.clock.sleep(for: configuration.failureDetector.heartbeatInterval / 2)
            let due = state.withLock { $0.dueAssignments() }
            await withDiscardingTaskGroup { group in
                for (id, sequence, assign) in due {
                    group.addTask { await self.assignBudgets(sequenceID: id, sequence, assign) }
                }
            }
        }
    }

    /// Every heartbeat interval: closes the sequences whose lease is up (`orphanGrace` without a
    /// watching client), and sends the Closes owed to connected workers: to holders of closed
    /// sequences that have not confirmed dropping them (a Close that timed out; the sequence stays
    /// charged until they have), and to holders of copies a rebuild left behind.
    private func retryCloses() async throws {
        while true {
            try await network.clock.sleep(for: configuration.failureDetector.heartbeatInterval)
            for id in (state.withLock { $0.orphans(grace: configuration.orphanGrace) }) {
                logger.warning(
                    "closing a sequence no client has watched for the orphan grace",
                    metadata: ["sequence.id": "\(id)", "grace": "\(configuration.orphanGrace)"]
                )
                _ = await closeEverywhere(id)
            }
            await withDiscardingTaskGroup { group in
                for (holder, close) in (state.withLock { $0.owedCloses() }) {
                    group.addTask { _ = await self.tellClose(close, to: holder) }
                }
            }
        }
    }

    /// Closes the sequence and tells every holder to drop its copies; returns the bytes the primaries
    /// freed, or nil if it was not open. A holder that cannot be told now is told again later.
    func closeEverywhere(_ sequenceID: UInt64) async -> UInt64? {
        guard let sequence = (state.withLock { $0.close(sequenceID) }) else { return nil }
        logger.debug(
            "closed",
            metadata: [
                "sequence.id": "\(sequenceID)",
                "holders": "\(Set(sequence.shards.flatMap { $0.holders.map(\.node) }).sorted())",
            ]
        )
        var message = Tessera_V1_Close()
        message.tenant = sequence.tenant
        message.sequenceID = sequenceID
        // Freed bytes count the primaries' copies, as the accounting does.
        var freed: UInt64 = 0
        for shard in sequence.shards {
            for holder in shard.holders {
                guard let ack = await tellClose(message, to: holder.node) else { continue }
                if holder == shard.primary { freed = freed.saturatingSum(ack.freedBytes) }
            }
        }
        return freed
    }

    /// Tells `holder` to drop its copies of a closed sequence and records that it did; nil when it
    /// cannot be told now (`retryCloses` tells it again, and so does its next registration).
    func tellClose(_ close: Tessera_V1_Close, to holder: NodeID) async -> Tessera_V1_CloseAck? {
        guard let link = (try? state.withLock { try $0.connection(for: holder) }),
            case .closeAck(let ack) = try? await link.request(.close(close))
        else { return nil }
        state.withLock { $0.closeAnswered(close, by: holder) }
        return ack
    }

    private func copy(_ plan: ReplicationPlan) async {
        await withSpan(
            "re_replicate",
            continuing: plan.trace,
            attributes: [
                "tessera.sequence.id": "\(plan.sequenceID)", "tessera.shard.id": .int64(Int64(plan.shardID)),
                "tessera.target": .string(plan.target.node.rawValue),
            ]
        ) {
            var message = Tessera_V1_CopyShard()
            message.sequenceID = plan.sequenceID
            message.shardID = plan.shardID
            message.epoch = plan.epoch
            message.target = plan.target.endpoint
            let metadata: Logger.Metadata = [
                "sequence.id": "\(plan.sequenceID)", "shard.id": "\(plan.shardID)", "peer.id": "\(plan.target.node)",
            ]
            let started = ContinuousClock.now
            var copied: Tessera_V1_CopyShardAck?
            do {
                let primary = try state.withLock { try $0.connection(for: plan.primary.node) }
                let reply = try await primary.request(
                    .copyShard(message),
                    timeout: .seconds(120)
                )
                guard case .copyShardAck(let ack) = reply else {
                    throw WireError(.internal, "the primary answered copy_shard with \(reply)")
                }
                copied = ack
            } catch {
                logger.warning(
                    "re-replication failed; will retry",
                    metadata: metadata.merging(["error": "\(error)"]) { $1 }
                )
            }
            guard let copied else {
                _ = state.withLock { $0.finishCopy(plan, succeeded: false) }
                Counter(label: TesseraMetrics.reReplicationsTotal, dimensions: [("outcome", "error")]).increment()
                return
            }
            guard (state.withLock { $0.finishCopy(plan, succeeded: true) }) else {
                Counter(label: TesseraMetrics.reReplicationsTotal, dimensions: [("outcome", "superseded")]).increment()
                return
            }
            Counter(label: TesseraMetrics.reReplicationsTotal, dimensions: [("outcome", "ok")]).increment()
            Counter(label: TesseraMetrics.reReplicatedBytesTotal).increment(
                by: Int64(clamping: copied.transferredBytes)
            )
            logger.info(
                "re-replicated",
                metadata: metadata.merging([
                    "bytes": "\(copied.transferredBytes)",
                    "millis": "\(Int((ContinuousClock.now - started) / .milliseconds(1)))",
                ]) { $1 }
            )
        }
    }

    /// Promotes replicas of the shards dead workers held, tells every remaining holder its new role
    /// and epoch, and pushes the new placement to the clients watching the sequence. A compressed
    /// sequence's copies all hold its budget already; one whose assignment is in flight has it
    /// retried at the new epoch if it missed a copy. Returns how many sequences moved.
    @discardableResult
    func failOver(dead: Set<NodeID>, only sequences: Set<UInt64>? = nil) async -> Int {
        let (moved, lost) = state.withLock { $0.failOver(dead: dead, only: sequences) }
        Counter(label: TesseraMetrics.failoversTotal).increment(by: Int64(moved.count))
        Counter(label: TesseraMetrics.lostSequencesTotal).increment(by: Int64(lost.count))
        for (id, holders) in lost {
            logger.error("a shard lost every copy; the sequence is closed", metadata: ["sequence.id": "\(id)"])
            var close = Tessera_V1_Close()
            close.sequenceID = id
            for holder in holders { _ = await tellClose(close, to: holder) }
        }
        // Every sequence at once: one slow copy must not hold up the others' new epoch.
        await withDiscardingTaskGroup { group in
            for (id, sequence) in moved {
                group.addTask {
                    await withSpan(
                        "failover",
                        continuing: sequence.trace,
                        attributes: ["tessera.sequence.id": "\(id)", "tessera.epoch": "\(sequence.epoch)"]
                    ) { await self.moveAnnounced(id, sequence) }
                }
            }
        }
        return moved.count
    }

    /// Tells the holders of a failed-over sequence, then its watching clients, where it lives now.
    private func moveAnnounced(_ id: UInt64, _ sequence: OpenSequenceState) async {
        do {
            try await announce(id, sequence)
            logger.info("failed over", metadata: ["sequence.id": "\(id)", "epoch": "\(sequence.epoch)"])
        } catch {
            logger.error("failover announcement failed", metadata: ["sequence.id": "\(id)", "error": "\(error)"])
        }
        // One-way: a client that does not hear it learns the placement when its next request to
        // the old primary is refused, or when it reconnects to the coordinator.
        var moved = Tessera_V1_PlacementMoved()
        moved.placement = Self.placement(id, sequence)
        for client in (state.withLock { $0.watchers(of: id) }) {
            try? await client.notify(.placementMoved(moved))
        }
    }

    /// Tells every holder of each shard its part of the sequence (role, replicas, epoch): before the
    /// client may write to a new sequence, and after a failover.
    func announce(_ sequenceID: UInt64, _ sequence: OpenSequenceState) async throws {
        let placement = Self.placement(sequenceID, sequence)
        for shard in sequence.shards {
            var assignment = Tessera_V1_ShardAssignment()
            assignment.tenant = sequence.tenant
            assignment.sequenceID = sequenceID
            assignment.epoch = sequence.epoch
            assignment.shard = placement.shards[Int(shard.id)]
            assignment.model = sequence.message.model
            assignment.spans = sequence.message.spans
            assignment.policy = sequence.message.policy
            assignment.decodeTokens = sequence.message.decodeTokens
            for holder in shard.holders {
                guard
                    let link =
                        (try state.withLock {
                            try $0.connection(for: holder.node, holding: sequenceID, at: sequence.epoch)
                        })
                else {
                    // Moved on meanwhile: the move announces its own epoch to the holders it keeps.
                    continue
                }
                _ = try await link.request(.shardAssignment(assignment))
            }
        }
    }

    /// Carries out a budget assignment: allocates the layers' budgets at `assign.retention` from the
    /// statistics and sends every copy of every shard its layers' budgets, then tells the state
    /// whether every copy applied them (compression is deterministic, so replicas end up with the
    /// primary's bytes; accounting counts the primaries').
    func assignBudgets(sequenceID: UInt64, _ sequence: OpenSequenceState, _ assign: BudgetLifecycle.Assign) async {
        await withSpan(
            "budget_cycle",
            continuing: sequence.trace,
            attributes: ["tessera.sequence.id": "\(sequenceID)", "tessera.retention": .double(assign.retention)]
        ) {
            let metadata: Logger.Metadata = ["sequence.id": "\(sequenceID)", "retention": "\(assign.retention)"]
            var everyCopyApplied = true
            var held: UInt64 = 0
            var shares: HeadRowShares?
            do {
                let budgets = try BudgetAllocator.allocate(
                    policy: sequence.policy,
                    retention: assign.retention,
                    geometry: sequence.geometry,
                    statistics: (0..<sequence.geometry.layers).compactMap { sequence.statistics[$0] }
                )
                for shard in sequence.shards {
                    let message = try budgets.filter { shard.layers.contains($0.layer) }
                        .proto(sequenceID: sequenceID, epoch: sequence.epoch)
                    for holder in shard.holders {
                        do {
                            let link = try state.withLock { try $0.connection(for: holder.node) }
                            let reply = try await link.request(.assignBudget(message))
                            guard case .budgetApplied(let applied) = reply else {
                                throw WireError(.internal, "\(holder.node) answered assign_budget with \(reply)")
                            }
                            if holder == shard.primary {
                                held = held.saturatingSum(applied.kvBytes)
                                shares = shares.merged(
                                    with: HeadRowShares(proto: applied.headRowShares, present: applied.hasHeadRowShares)
                                )
                            }
                        } catch {
                            everyCopyApplied = false
                            logger.warning(
                                "a copy did not apply its budget",
                                metadata: metadata.merging(["peer.id": "\(holder.node)", "error": "\(error)"]) { $1 }
                            )
                        }
                    }
                }
            } catch {
                everyCopyApplied = false
                logger.error("budget allocation failed", metadata: metadata.merging(["error": "\(error)"]) { $1 })
            }
            let phase = state.withLock {
                $0.finishAssignment(
                    sequenceID,
                    everyCopyApplied: everyCopyApplied,
                    primaryBytes: held,
                    headRowShares: shares
                )
            }
            if case .retrying(_, let attempt, let due) = phase {
                logger.warning(
                    "budget assignment will be retried",
                    metadata: metadata.merging(["attempt": "\(attempt)", "due": "\(due)"]) { $1 }
                )
            }
        }
    }

    /// Makes room for a sequence of `estimate` bytes by halving the retention of compressed
    /// sequences, largest first, never below the floor ratio; stops once it fits. When only the
    /// tenant's quota is short, only that tenant's sequences are tightened.
    func relieve(tenant: String, estimate: UInt64) async {
        let short = state.withLock { $0.shortfall(tenant: tenant, estimate: estimate) }
        guard short.memory > 0 || short.quota > 0 else { return }
        let floor = configuration.floorRatio
        for candidate in (state.withLock { $0.tightenable(floor: floor, tenant: short.memory > 0 ? nil : tenant) }) {
            // As it stands now (a copy may have added a replica since the list was made); one with a
            // copy or another assignment in flight is skipped.
            guard let (sequence, assign) = (state.withLock { $0.beginTightening(candidate, floor: floor) }) else {
                continue
            }
            Counter(label: TesseraMetrics.tighteningsTotal).increment()
            logger.info(
                "tightening under memory pressure",
                metadata: ["sequence.id": "\(candidate)", "retention": "\(assign.retention)"]
            )
            await assignBudgets(sequenceID: candidate, sequence, assign)
            let now = state.withLock { $0.shortfall(tenant: tenant, estimate: estimate) }
            if now.memory == 0 && now.quota == 0 { return }
        }
    }

    /// The bytes admission charges for open sequences (and for closed ones whose holders have not
    /// confirmed dropping them), and what it charges each sequence.
    package func accounted() async -> (bytes: UInt64, sequences: [UInt64: UInt64]) {
        state.withLock { $0.accounted() }
    }

    /// Workers the coordinator believes alive.
    package func liveWorkers() async -> Int { state.withLock { $0.membership.liveNodeIDs.count } }

    /// The placement message a client gets for an open sequence.
    static func placement(_ sequenceID: UInt64, _ sequence: OpenSequenceState) -> Tessera_V1_Placement {
        var placement = Tessera_V1_Placement()
        placement.sequenceID = sequenceID
        placement.epoch = sequence.epoch
        placement.shards = sequence.shards.map { shard in
            var message = Tessera_V1_ShardPlacement()
            message.shardID = shard.id
            message.firstLayer = UInt32(shard.layers.lowerBound)
            message.layerCount = UInt32(shard.layers.count)
            message.primary = shard.primary.endpoint
            message.replicas = shard.replicas.map(\.endpoint)
            return message
        }
        return placement
    }
}

extension ShardHolder {
    init(_ endpoint: Tessera_V1_Endpoint) {
        self.init(node: NodeID(endpoint.nodeID), address: NodeAddress(host: endpoint.host, port: Int(endpoint.port)))
    }

    var endpoint: Tessera_V1_Endpoint {
        var endpoint = Tessera_V1_Endpoint()
        endpoint.nodeID = node.rawValue
        endpoint.host = address.host
        endpoint.port = UInt32(address.port)
        return endpoint
    }
}

/// One reading of the coordinator's gauges (`CoordinatorState.gauges`), which the service records.
struct CoordinatorGauges {
    /// A label set of `tessera_kv_bytes`.
    struct NodeModality: Hashable {
        var node: String
        var modality: String
    }

    /// A label set of `tessera_accounted_kv_bytes`.
    struct Account: Hashable {
        var tenant: String
        var policy: String
    }

    var liveSequences: Int
    var memoryLimitBytes: UInt64
    var underReplicatedShards: Int
    var workers: [MemberState: Int]
    var kvBytes: [NodeModality: UInt64] = [:]
    var accounted: [Account: UInt64] = [:]

    func record() {
        Gauge(label: TesseraMetrics.liveSequences).record(liveSequences)
        for (key, bytes) in kvBytes {
            Gauge(label: TesseraMetrics.kvBytes, dimensions: [("node", key.node), ("modality", key.modality)])
                .record(bytes)
        }
        for (key, bytes) in accounted {
            Gauge(label: TesseraMetrics.accountedKVBytes, dimensions: [("tenant", key.tenant), ("policy", key.policy)])
                .record(bytes)
        }
        Gauge(label: TesseraMetrics.memoryLimitBytes).record(memoryLimitBytes)
        Gauge(label: TesseraMetrics.underReplicatedShards).record(underReplicatedShards)
        for (state, count) in workers {
            Gauge(label: TesseraMetrics.workers, dimensions: [("state", state.rawValue)]).record(count)
        }
    }
}

import ClusterAdmin
import ClusterState
import ClusterTransport
import ClusterWire
import KVCacheCore

/// What the coordinator's state keeps of a connection: which one it is, and whether it has closed.
/// The service passes its `PeerConnection`s; tests pass inert tokens, so that the state's decisions
/// run without sockets.
protocol CoordinatorLink: AnyObject, Sendable {
    var isClosed: Bool { get }
}

extension PeerConnection: CoordinatorLink {}

/// A worker the coordinator knows: its membership entry lives in `Membership`; this holds the live
/// connection and what its heartbeats last reported.
struct WorkerLink<Link: CoordinatorLink>: Sendable {
    var connection: Link
    var address: NodeAddress
    var kvBytes: UInt64 = 0
    var kvBytesByModality: [Tessera_V1_ModalityBytes] = []
    var rssBytes: UInt64 = 0
    var auditBytes: UInt64 = 0
    var liveSequences: UInt32 = 0
}

/// A worker holding a copy of a shard.
struct ShardHolder: Sendable, Hashable {
    var node: NodeID
    var address: NodeAddress
}

/// One shard of one open sequence: a slice of its layers, the primary that accepts its writes and
/// the replicas the primary forwards them to.
struct SequenceShard: Sendable {
    var id: UInt32
    var layers: Range<Int>
    var primary: ShardHolder
    var replicas: [ShardHolder]

    var holders: [ShardHolder] { [primary] + replicas }
}

/// An open sequence: what it was opened with, where it lives, and the layer statistics gathered so far.
struct OpenSequenceState: Sendable {
    var tenant: String
    var geometry: ModelGeometry
    var layout: PromptLayout
    var message: Tessera_V1_OpenSequence
    var policy: CompressionPolicy
    var epoch: UInt64
    var shards: [SequenceShard]
    var statistics: [Int: LayerStatistics] = [:]
    /// Statistics gathered, budget sent, compressed once every copy applied it; only then can it be
    /// copied or tightened.
    var budget: BudgetLifecycle
    /// Bytes reserved for the rows decode will append (the client's expected decode tokens, Float32,
    /// every copy).
    var decodeAllowance: UInt64
    /// Copies of each shard charged for: the replication factor, which re-replication restores.
    var copies: Int
    /// For a sequence rebuilt from the workers' registrations (coordinator restart): each shard's bytes
    /// as its copies reported them.
    var restoredBytes: [UInt32: UInt64]?
    /// Every holder has acknowledged its shard assignment (or reported the copy it holds): a repeated
    /// open is answered with the placement from then on, and told to retry before.
    var announced = false
    /// The trace context the open came with (`Envelope.trace_context`): the coordinator's own work on
    /// the sequence (its budget cycles, failovers, copies) joins that trace. Empty when untraced.
    var trace: [String: String] = [:]
    /// How the primaries' compressed heads keep the prompt after the last budget every copy applied
    /// (shown by `status`).
    var headRowShares: HeadRowShares?
}

/// What a worker declared dead may still hold: the copies it had, until its lease lapses (it cannot
/// be told it is dead, if it is only cut off).
struct LapsingCopies: Sendable {
    var incarnation: UInt64
    var until: ClusterInstant
    var bytes: UInt64
}

/// A copy of one shard to a worker that holds no shard of its sequence, to restore the replication
/// factor after a loss.
struct ReplicationPlan: Sendable {
    /// Which of the coordinator's copies it is.
    var copy: UInt64
    var sequenceID: UInt64
    var shardID: UInt32
    var epoch: UInt64
    var primary: ShardHolder
    var target: ShardHolder
    /// The sequence's trace context, which the copy joins.
    var trace: [String: String] = [:]
}

/// The coordinator's soft state: membership, open sequences (with their placement) and admission.
/// A value type whose decisions are `mutating` methods returning what to do: it holds no clock
/// (time is `elapsed` since it started, read from the closure it is given), sends nothing and
/// records no metrics. The service keeps it in a `Mutex` and carries out what it decides.
struct CoordinatorState<Link: CoordinatorLink>: Sendable {
    var membership: Membership
    var admission: Admission
    var workers: [NodeID: WorkerLink<Link>] = [:]
    var sequences: [UInt64: OpenSequenceState] = [:]
    /// Numbers the shard copies this coordinator plans (`BudgetLifecycle.Phase.copying`).
    private var lastCopy: UInt64 = 0
    /// Sequences whose last copy failed, and when to try again.
    private var copyRetry: [UInt64: ClusterInstant] = [:]
    /// Time since this coordinator started.
    private let elapsed: @Sendable () -> Duration
    private let rebuildGrace: Duration
    private let weakened: Set<Protection>
    /// This coordinator's incarnation (wall-clock nanoseconds when it started). Epochs it gives
    /// count up from there (see `nextEpoch`), so that they never go back across restarts, even for a
    /// sequence id reopened after a restart that lost it.
    private let incarnation: UInt64
    /// The last epoch this coordinator gave a sequence.
    private var lastEpoch: UInt64
    /// Whether this coordinator replaces another (it was not told it starts a new cluster, or a
    /// worker registered that had registered with another coordinator before).
    private var replacesAnother: Bool
    /// When the first worker registered with this coordinator (time since it started).
    private var firstRegistration: Duration?

    /// Copies of every shard of a sequence (one primary and `replication − 1` replicas), when enough
    /// workers are live.
    let replication: Int

    /// Per open sequence, the client connections to tell when a failover moves it: those that opened
    /// it or asked for its placement.
    private var watchers: [UInt64: [Link]] = [:]
    /// Since when (elapsed time) each open sequence has had no watcher; see `orphans(grace:)`.
    private var unwatchedSince: [UInt64: Duration] = [:]
    /// Where `freeSequenceID` looks next.
    private var nextChosenID: UInt64 = 1 << 62

    /// Closed sequences whose Close some holders have not answered (their connection was down): a
    /// registration of theirs must not bring the sequence back, and they are told to close it again.
    /// A holder declared dead leaves it (it rejoins as a new incarnation, holding nothing).
    private var unconfirmedCloses: [UInt64: Set<NodeID>] = [:]
    /// Copies a rebuild superseded, per holder: the sequence and the copy's epoch. A worker that
    /// registered with a copy before another reported a newer epoch of the same sequence holds a copy
    /// no placement names; it is told to drop it (up to that epoch, so that a newer copy made to it
    /// since survives) until it confirms, registers again or is declared dead.
    private var leftBehind: [NodeID: [UInt64: UInt64]] = [:]

    /// Counts the changes to this coordinator's members; it versions the views it sends.
    private var membershipVersion: UInt64 = 0
    /// While rebuilding: the newest membership view a registering worker brought from an earlier
    /// coordinator. A worker that view does not count as live missed that coordinator's decisions
    /// (closes, failovers): its copies are not rebuilt from, and it rejoins holding nothing.
    private var inheritedView: Tessera_V1_MembershipView?
    /// Members declared dead outside `tick` (see `inherit`), for the next tick to report.
    private var pendingChanges: [MembershipChange] = []
    /// The workers whose registrations reported copies of each rebuilt sequence.
    private var rebuiltFrom: [UInt64: Set<NodeID>] = [:]
    /// Workers declared dead whose copies are reserved out of the memory limit until their lease
    /// lapses (see `CoordinatorConfiguration.workerLease`).
    private var lapsing: [NodeID: LapsingCopies] = [:]
    private let workerLease: Duration
    /// While rebuilding: per sequence, the newest epoch a worker reported dropping it on a Close at,
    /// or this coordinator closed it at. Copies at that epoch or older belong to a closed sequence.
    private var closedThrough: [UInt64: UInt64] = [:]

    /// - Parameter elapsed: time since this coordinator started, on the clock of its network.
    init(configuration: CoordinatorConfiguration, elapsed: @escaping @Sendable () -> Duration) throws {
        replication = configuration.replication
        rebuildGrace = configuration.failureDetector.deadAfter
        workerLease = configuration.workerLease
        weakened = configuration.weakened
        incarnation = configuration.incarnation
        lastEpoch = max(configuration.incarnation, 1) - 1
        replacesAnother = !configuration.startsNewCluster
        membership = try Membership(settings: configuration.failureDetector)
        admission = Admission(
            memoryLimitBytes: configuration.memoryLimitBytes,
            tenantQuotaBytes: configuration.tenantQuotaBytes
        )
        self.elapsed = elapsed
    }

    var now: ClusterInstant { ClusterInstant(elapsed: elapsed()) }

    /// A new epoch for a sequence at `current`: above it, and above every epoch given before, so that
    /// a sequence id closed and opened again never repeats an epoch of its earlier life (a worker's
    /// record of a closed copy names one).
    private mutating func nextEpoch(after current: UInt64) -> UInt64 {
        lastEpoch = max(lastEpoch, current) + 1
        return lastEpoch
    }

    /// After a start, until the failure detector would have declared a silent worker dead: workers
    /// that outlived a previous coordinator are still registering, and their copies rebuild the
    /// sequences it had open. A coordinator replacing another also waits that long after the first
    /// worker registered: when its links are slow (every frame held for seconds), silence at start
    /// says nothing about what the workers hold.
    var isRebuilding: Bool {
        let elapsed = elapsed()
        guard elapsed > rebuildGrace else { return true }
        guard replacesAnother else { return false }
        return firstRegistration.map { elapsed <= $0 + rebuildGrace } ?? true
    }

    /// What a request that must wait for the rebuild is told: retry shortly.
    private func stillRebuilding(_ detail: String) -> WireError {
        WireError(
            .unavailable,
            "the coordinator started \(elapsed()) ago and is still hearing from its workers: \(detail); retry",
            retryAfter: .milliseconds(250)
        )
    }

    /// Registers a worker; returns the membership changes it caused, the copies it holds of
    /// sequences closed since, which it must be told to close, and the rebuilt sequences that name it
    /// as a holder although it reported no copy of them (to fail over off it).
    mutating func register(
        _ message: Tessera_V1_RegisterWorker,
        connection: Link
    ) throws(WireError) -> (
        changes: [MembershipChange], staleCopies: [Tessera_V1_Close], lostCopies: [NodeID: Set<UInt64>]
    ) {
        let nodeID = NodeID(message.endpoint.nodeID)
        let address = NodeAddress(host: message.endpoint.host, port: Int(message.endpoint.port))
        // A worker that timed out against a paused coordinator has given up on that connection and
        // registers again on a new one; the old registration, read before the pause, may only now be
        // processed. It must not become the worker's link.
        guard !connection.isClosed else {
            throw WireError(.unavailable, "registration of \(nodeID) came on a connection that has closed since")
        }
        if isRebuilding, message.hasLastView { inherit(message.lastView) }
        if isRebuilding, let view = inheritedView, !message.heldShards.isEmpty,
            !view.counts(nodeID.rawValue, incarnation: message.incarnation)
        {
            throw WireError(
                .staleEpoch,
                "registration of \(nodeID) refused: coordinator \(view.coordinatorIncarnation) no longer counted "
                    + "incarnation \(message.incarnation) as live, so the copies it holds are stale"
            )
        }
        let outcome = membership.join(
            nodeID: nodeID,
            incarnation: message.incarnation,
            address: MemberAddress(host: address.host, port: address.port),
            memoryCapacityBytes: message.memoryCapacityBytes,
            now: now
        )
        guard case .accepted = outcome else {
            if case .refused(let reason) = outcome {
                switch reason {
                case .declaredDead, .staleIncarnation:
                    // The worker's shards were failed over: it must drop them and rejoin as new.
                    throw WireError(.staleEpoch, "registration of \(nodeID) refused: \(reason)")
                case .invalidAddress:
                    throw WireError(.badRequest, "registration of \(nodeID) refused: \(reason)")
                }
            }
            return ([], [], [:])
        }
        membershipVersion += 1
        // A later incarnation holds nothing of the dead one's: it restarted, or dropped everything.
        if let dead = lapsing[nodeID], message.incarnation > dead.incarnation {
            lapsing[nodeID] = nil
            reserveLapsingCopies()
        }
        workers[nodeID] = WorkerLink(connection: connection, address: address)
        if firstRegistration == nil { firstRegistration = elapsed() }
        // What it reports now is judged afresh below.
        leftBehind[nodeID] = nil
        let previous = message.previousCoordinatorIncarnation
        if previous != 0 && previous != incarnation { replacesAnother = true }
        var (stale, lost) = restore(message.heldShards, closed: message.closedSequences, from: nodeID)
        // Rebuilt placements name holders by node id: a worker that restarted since holds nothing of
        // its earlier incarnation's copies, and must not be taken for their holder.
        let reported = Set(message.heldShards.map(\.assignment.sequenceID))
        let own = sequences.filter { id, sequence in
            sequence.restoredBytes != nil && !reported.contains(id) && !sequence.budget.isCopying
                && sequence.shards.contains { $0.holders.contains { $0.node == nodeID } }
        }.keys
        if !own.isEmpty { lost[nodeID, default: []].formUnion(own) }
        return (outcome.changes, stale, lost)
    }

    /// Takes `view` if it is newer than the one inherited so far. Workers registered already that it
    /// does not count as live are declared dead (the next tick fails their shards over, and they drop
    /// their copies when refused); sequences rebuilt from their copies alone were given up by that
    /// coordinator, and are forgotten.
    private mutating func inherit(_ view: Tessera_V1_MembershipView) {
        guard view.coordinatorIncarnation < incarnation, view.isNewer(than: inheritedView) else { return }
        inheritedView = view
        let stale = Set(
            membership.members.filter {
                $0.state != .dead && !view.counts($0.nodeID.rawValue, incarnation: $0.incarnation)
            }
            .map(\.nodeID)
        )
        guard !stale.isEmpty else { return }
        for (id, reporters) in rebuiltFrom where reporters.isSubset(of: stale) { forgetRebuilt(id) }
        for nodeID in stale.sorted() {
            guard let member = membership.member(nodeID),
                let change = membership.declareDead(nodeID: nodeID, incarnation: member.incarnation, now: now)
            else { continue }
            pendingChanges.append(change)
        }
    }

    /// Forgets a sequence rebuilt from copies that turned out stale (a worker reported it closed, or
    /// every copy came from workers an earlier coordinator had given up): nothing is charged for it,
    /// and the workers that reported copies are told to drop them.
    private mutating func forgetRebuilt(_ sequenceID: UInt64) {
        guard let sequence = sequences[sequenceID], sequence.restoredBytes != nil else { return }
        // The reporters, and any copy made since (a failover's re-replication).
        let holders = Set(sequence.shards.flatMap(\.holders).map(\.node))
        for node in holders.union(rebuiltFrom[sequenceID] ?? []) {
            leftBehind[node, default: [:]][sequenceID] = sequence.epoch
        }
        sequences[sequenceID] = nil
        rebuiltFrom[sequenceID] = nil
        watchers[sequenceID] = nil
        unwatchedSince[sequenceID] = nil
        _ = admission.release(sequenceID: sequenceID)
    }

    /// Workers the inherited view counts as live that have not registered with this coordinator: they
    /// may hold copies nobody charges (of sequences only they held), until they register or their
    /// lease lapses (twice the lease after this coordinator started, as their predecessor's last
    /// acknowledgement came before). Nothing is admitted meanwhile.
    func unheardFromPredecessor() -> [NodeID] {
        guard let view = inheritedView, elapsed() < workerLease * 2 else { return [] }
        return view.members.map { NodeID($0.nodeID) }.filter { membership.member($0) == nil }.sorted()
    }

    /// Whether this coordinator replaces another and no registering worker brought a membership view
    /// (the predecessor stopped before its own rebuild was over): any worker not yet registered may
    /// hold copies nobody charges, so nothing is admitted until their leases have lapsed.
    var predecessorLeftNoView: Bool { replacesAnother && inheritedView == nil && elapsed() < workerLease * 2 }

    /// This coordinator's membership view, once its rebuild is over: the workers it counts as live.
    func view() -> Tessera_V1_MembershipView? {
        guard !isRebuilding else { return nil }
        var view = Tessera_V1_MembershipView()
        view.coordinatorIncarnation = incarnation
        view.version = membershipVersion
        view.members = membership.members.filter { $0.state != .dead }.map { member in
            var entry = Tessera_V1_ViewMember()
            entry.nodeID = member.nodeID.rawValue
            entry.incarnation = member.incarnation
            return entry
        }
        return view
    }

    /// Rebuilds open sequences from the copies a registering worker reports, after a coordinator
    /// restart: the newest epoch of a sequence wins, each shard's holders are as its copies say, and
    /// admission charges each primary's bytes for every copy. Sequences this coordinator opened itself
    /// are left alone. The workers send their layer statistics again right after registering: a
    /// sequence still prefilling gets its budget, a compressed one can be tightened again.
    ///
    /// Returns the copies the worker must drop: of sequences closed meanwhile (the Close did not reach
    /// it), of sequences another worker reports it dropped on a Close before the restart (see
    /// `closedThrough`: a sequence rebuilt from such copies is forgotten), and, once the rebuild is
    /// over, of sequences this coordinator does not know (closed before a restart that lost the
    /// record, or given up as unknown by their clients).
    private mutating func restore(
        _ held: [Tessera_V1_HeldShard],
        closed: [Tessera_V1_ClosedSequence],
        from nodeID: NodeID
    ) -> (stale: [Tessera_V1_Close], missing: [NodeID: Set<UInt64>]) {
        if isRebuilding {
            for record in closed {
                closedThrough[record.sequenceID] = max(closedThrough[record.sequenceID] ?? 0, record.epoch)
                if let known = sequences[record.sequenceID], known.epoch <= record.epoch {
                    forgetRebuilt(record.sequenceID)
                }
            }
        }
        var stale: [Tessera_V1_Close] = []
        var missing: [NodeID: Set<UInt64>] = [:]
        for copy in held {
            let a = copy.assignment
            let closing = unconfirmedCloses[a.sequenceID]?.contains(nodeID) == true
            if closing || (sequences[a.sequenceID] == nil && !isRebuilding) || isLeftBehind(a, on: nodeID)
                || a.epoch <= closedThrough[a.sequenceID] ?? 0
            {
                var close = Tessera_V1_Close()
                close.tenant = a.tenant
                close.sequenceID = a.sequenceID
                // Up to this copy's epoch: a copy made to the worker after it registered is kept. A
                // closed sequence's Close carries none, as it confirms the close (`closeAnswered`).
                if !closing { close.epoch = a.epoch }
                stale.append(close)
                continue
            }
            guard let geometry = try? ModelGeometry(proto: a.model), let layout = try? PromptLayout(proto: a.spans),
                let (policy, retention) = try? CompressionPolicy.decode(proto: a.policy),
                a.shard.layerCount >= 1, Int(a.shard.firstLayer) + Int(a.shard.layerCount) <= geometry.layers
            else { continue }
            let first = Int(a.shard.firstLayer)
            var shard = SequenceShard(
                id: a.shard.shardID,
                layers: first..<(first + Int(a.shard.layerCount)),
                primary: ShardHolder(a.shard.primary),
                replicas: a.shard.replicas.map(ShardHolder.init)
            )
            // A copy's assignment may predate copies made from it (a replica installed by
            // re-replication lists the holders as they were before it): every copy reported is a
            // holder, the reporting worker included.
            if !shard.holders.contains(where: { $0.node == nodeID }), let address = workers[nodeID]?.address {
                shard.replicas.append(ShardHolder(node: nodeID, address: address))
            }
            let full = Self.charge(geometry, layout, decodeTokens: a.decodeTokens, copies: replication)
            var state: OpenSequenceState
            // Rebuilt from this copy's assignment alone: no other copy of its epoch was reported yet.
            var firstOfEpoch = true
            if let known = sequences[a.sequenceID] {
                guard known.restoredBytes != nil, a.epoch >= known.epoch else { continue }
                state = known
                firstOfEpoch = a.epoch > state.epoch
                if a.epoch > state.epoch {
                    for holder in Set(state.shards.flatMap(\.holders).map(\.node)) where holder != nodeID {
                        leftBehind[holder, default: [:]][a.sequenceID] = state.epoch
                    }
                    state.epoch = a.epoch
                    state.shards = []
                    state.restoredBytes = [:]
                    rebuiltFrom[a.sequenceID] = []
                }
            } else {
                var message = Tessera_V1_OpenSequence()
                message.tenant = a.tenant
                message.sequenceID = a.sequenceID
                message.model = a.model
                message.spans = a.spans
                message.policy = a.policy
                message.decodeTokens = a.decodeTokens
                state = OpenSequenceState(
                    tenant: a.tenant,
                    geometry: geometry,
                    layout: layout,
                    message: message,
                    policy: policy,
                    epoch: a.epoch,
                    shards: [],
                    budget: BudgetLifecycle(restoredCompressed: copy.compressed, retention: retention),
                    decodeAllowance: full.decodeAllowance,
                    copies: replication,
                    restoredBytes: [:],
                    announced: true
                )
            }
            if !copy.compressed { state.budget.copyUncompressed() }
            // The assignment names the holders as they were. One that has registered here already
            // without reporting this copy (it restarted, or dropped it) holds none: it must not be
            // taken for a holder, let alone promoted. (One registering later is caught by
            // `register`'s own check.)
            if firstOfEpoch {
                for holder in shard.holders where holder.node != nodeID && workers[holder.node] != nil {
                    missing[holder.node, default: []].insert(a.sequenceID)
                }
            }
            if let known = state.shards.first(where: { $0.id == shard.id }) {
                for holder in known.holders where !shard.holders.contains(where: { $0.node == holder.node }) {
                    shard.replicas.append(holder)
                }
            }
            state.shards.removeAll { $0.id == shard.id }
            state.shards.append(shard)
            state.shards.sort { $0.layers.lowerBound < $1.layers.lowerBound }
            // Any copy tells the shard's size (copies of a shard are alike); the largest reported
            // counts, so a shard whose primary died with the old coordinator is still charged.
            state.restoredBytes![shard.id] = max(state.restoredBytes![shard.id] ?? 0, copy.kvBytes)
            sequences[a.sequenceID] = state
            rebuiltFrom[a.sequenceID, default: []].insert(nodeID)
            // Saturating: the figures are what workers report. Until every copy is compressed, the
            // sequence is charged its full size, as at admission: a copy not prefilled yet reports
            // nothing, and its prefill is still to come.
            let shards = state.restoredBytes!.values.reduce(UInt64(0)) { $0.saturatingSum($1) }
            let reported = shards.saturatingProduct(UInt64(state.copies)).saturatingSum(state.decodeAllowance)
            admission.restore(
                tenant: state.tenant,
                sequenceID: a.sequenceID,
                kvBytes: state.budget.isCompressed ? reported : max(reported, full.estimate)
            )
        }
        return (stale, missing)
    }

    /// Whether `nodeID`'s copy (as `assignment` describes it) belongs to no current placement: the
    /// sequence places no shard on the node, and either this coordinator opened it (an open that
    /// failed half way, an older placement) or the copy is older than the sequence's epoch (failed
    /// over while the node was away). A copy at the sequence's epoch being made to it right now is
    /// not one, nor is a copy at least as new as a rebuilt sequence (it rebuilds it).
    private func isLeftBehind(_ assignment: Tessera_V1_ShardAssignment, on nodeID: NodeID) -> Bool {
        guard let known = sequences[assignment.sequenceID],
            !known.shards.contains(where: { $0.holders.contains { $0.node == nodeID } })
        else { return false }
        // A copy being made now is reported before it becomes a holder, at the sequence's epoch; an
        // older copy is stale whatever is under way.
        return assignment.epoch < known.epoch
            || (known.restoredBytes == nil && !known.budget.isCopying)
    }

    /// Holders of open sequences' shards that are not registered members once the rebuild is over
    /// (they died while the coordinator was down, so the failure detector never met them).
    func unregisteredHolders() -> Set<NodeID> {
        guard !isRebuilding else { return [] }
        var missing = Set<NodeID>()
        for sequence in sequences.values {
            for holder in sequence.shards.flatMap(\.holders) where membership.member(holder.node) == nil {
                missing.insert(holder.node)
            }
        }
        return missing
    }

    // MARK: Re-replication

    /// Copies that would bring shards of compressed sequences back to the replication factor (or to
    /// as many copies as there are placeable workers): at most `limit`, one per sequence, each from the
    /// shard's primary to the placeable worker holding the fewest shard copies among those that hold
    /// no shard of that sequence. The sequences are `copying` until `finishCopy`. None while
    /// the charges and the copies dead workers may still hold exceed the memory limit.
    mutating func replicationPlans(limit: Int) -> [ReplicationPlan] {
        // Charges count every copy a sequence should have, so a new copy fits under them; but a dead
        // worker may still hold the copy it replaces, until its lease lapses.
        let used = admission.totalBytes.saturatingSum(admission.reservedBytes)
        guard admission.memoryLimitBytes == 0 || used <= admission.memoryLimitBytes else { return [] }
        let live = placeable
        var load: [NodeID: Int] = [:]
        for sequence in sequences.values {
            for holder in sequence.shards.flatMap(\.holders) { load[holder.node, default: 0] += 1 }
        }
        var plans: [ReplicationPlan] = []
        for (id, sequence) in sequences.sorted(by: { $0.key < $1.key }) where plans.count < limit {
            guard case .compressed = sequence.budget.phase, copyRetry[id].map({ $0 <= now }) ?? true
            else {
                continue
            }
            let wanted = min(replication, live.count)
            let holding = Set(sequence.shards.flatMap(\.holders).map(\.node))
            guard let shard = sequence.shards.first(where: { $0.holders.count < wanted }),
                workers[shard.primary.node] != nil,
                let target = live.filter({ !holding.contains($0) }).min(by: {
                    (load[$0] ?? 0, $0) < (load[$1] ?? 0, $1)
                }),
                let address = workers[target]?.address
            else { continue }
            load[target, default: 0] += 1
            lastCopy += 1
            _ = sequences[id]!.budget.beginCopy(lastCopy)
            plans.append(
                ReplicationPlan(
                    copy: lastCopy,
                    sequenceID: id,
                    shardID: shard.id,
                    epoch: sequence.epoch,
                    primary: shard.primary,
                    target: ShardHolder(node: target, address: address),
                    trace: sequence.trace
                )
            )
        }
        return plans
    }

    /// Ends a planned copy. A successful copy becomes a replica of the shard only if the sequence is
    /// still open at the same epoch with the same primary; returns whether it did (otherwise the
    /// target's copy is owed a Close, sent with the close retries).
    mutating func finishCopy(_ plan: ReplicationPlan, succeeded: Bool) -> Bool {
        sequences[plan.sequenceID]?.budget.copyFinished(plan.copy)
        copyRetry[plan.sequenceID] = succeeded ? nil : now + .seconds(1)
        guard succeeded else { return false }
        guard var sequence = sequences[plan.sequenceID], sequence.epoch == plan.epoch,
            let k = sequence.shards.firstIndex(where: { $0.id == plan.shardID }),
            sequence.shards[k].primary == plan.primary
        else {
            // The sequence closed or moved to another epoch during the copy: nobody will write to the
            // target's copy, so it is owed a Close (retried until answered).
            leftBehind[plan.target.node, default: [:]][plan.sequenceID] = plan.epoch
            return false
        }
        sequence.shards[k].replicas.append(plan.target)
        sequences[plan.sequenceID] = sequence
        return true
    }

    /// Shards of open sequences with fewer copies than the replication factor allows now.
    var underReplicatedShards: Int {
        let wanted = min(replication, placeable.count)
        return sequences.values.reduce(0) { $0 + $1.shards.filter { $0.holders.count < wanted }.count }
    }

    /// A worker's own notice that this incarnation stops (`LeaveCluster`): declared dead at once, as
    /// the detector would after the dead-after time, so that its shards fail over now. Nil, changing
    /// nothing, when the coordinator knows another incarnation or has declared this one dead already.
    mutating func leave(_ nodeID: NodeID, incarnation: UInt64) -> MembershipChange? {
        membership.declareDead(nodeID: nodeID, incarnation: incarnation, now: now)
    }

    mutating func heartbeat(_ message: Tessera_V1_Heartbeat, from nodeID: NodeID, on connection: Link) throws(WireError)
    {
        let outcome = membership.heartbeat(nodeID: nodeID, incarnation: message.incarnation, now: now)
        switch outcome {
        case .refreshed, .recovered: break
        case .declaredDead, .staleIncarnation:
            throw WireError(.staleEpoch, "heartbeat from \(nodeID) refused: \(outcome); its shards were failed over")
        case .unknownMember, .unregisteredIncarnation:
            throw WireError(.badRequest, "heartbeat from \(nodeID) refused: \(outcome); register again")
        }
        // The link follows the connection the worker heartbeats on, so one left on a connection that
        // closed (a registration processed late, see `register`) heals within a heartbeat interval.
        if workers[nodeID]?.connection !== connection, let member = membership.member(nodeID) {
            var link =
                workers[nodeID]
                ?? WorkerLink(
                    connection: connection,
                    address: NodeAddress(host: member.address.host, port: member.address.port)
                )
            link.connection = connection
            workers[nodeID] = link
        }
        workers[nodeID]?.kvBytes = message.kvBytes
        workers[nodeID]?.kvBytesByModality = message.kvBytesByModality
        workers[nodeID]?.rssBytes = message.rssBytes
        workers[nodeID]?.auditBytes = message.auditBytes
        workers[nodeID]?.liveSequences = message.liveSequences
    }

    /// Advances the failure detector (the service fails over what dead workers held). Also returns the pause of
    /// this process the detector forgave, if any.
    mutating func tick() -> (changes: [MembershipChange], pause: Duration?) {
        let changes = pendingChanges + membership.tick(now: now)
        pendingChanges = []
        if !changes.isEmpty { membershipVersion += 1 }
        let lapsed = lapsing.filter { $0.value.until <= now }.keys
        for nodeID in lapsed { lapsing[nodeID] = nil }
        let deaths = changes.filter { $0.to == .dead }
        for change in deaths {
            lapsing[change.nodeID] = copiesHeld(by: change)
            workers[change.nodeID] = nil
            leftBehind[change.nodeID] = nil
            confirmCloses(by: change.nodeID)
        }
        if !lapsed.isEmpty || !deaths.isEmpty { reserveLapsingCopies() }
        return (changes, membership.lastPause)
    }

    /// What the worker that `change` declared dead may still hold: a copy's share of the charge of
    /// every sequence it held, open or closing, until twice the lease after its last heartbeat (it
    /// drops them once the lease has passed, or within a reconnection attempt after).
    private func copiesHeld(by change: MembershipChange) -> LapsingCopies {
        var bytes: UInt64 = 0
        let node = change.nodeID
        for (id, sequence) in sequences
        where sequence.shards.contains(where: { $0.holders.contains { $0.node == node } }) {
            bytes = bytes.saturatingSum((admission.sequence(id)?.chargedBytes ?? 0) / UInt64(max(sequence.copies, 1)))
        }
        for (id, holders) in unconfirmedCloses where holders.contains(node) {
            bytes = bytes.saturatingSum((admission.sequence(id)?.chargedBytes ?? 0) / UInt64(replication))
        }
        let heard = membership.member(node)?.lastHeartbeat ?? now
        return LapsingCopies(incarnation: change.incarnation, until: heard + workerLease * 2, bytes: bytes)
    }

    private mutating func reserveLapsingCopies() {
        admission.reservedBytes = lapsing.values.reduce(UInt64(0)) { $0.saturatingSum($1.bytes) }
    }

    /// Moves the shards that dead workers held: a shard whose primary died gets its first live
    /// replica as primary, a dead replica leaves the replica set; each sequence so changed moves to a
    /// new epoch, so writes still carrying the old one are refused (fencing). Returns those sequences,
    /// to announce, and the sequences that lost every copy of a shard: those are closed, with the
    /// holders of their other shards to tell. Closes the dead workers had not confirmed are confirmed.
    /// With `only`, just those sequences (a worker that lost its copies of them, see `register`).
    mutating func failOver(
        dead: Set<NodeID>,
        only: Set<UInt64>? = nil
    ) -> (moved: [(id: UInt64, sequence: OpenSequenceState)], lost: [(id: UInt64, holders: [NodeID])]) {
        if only == nil {
            for node in dead { confirmCloses(by: node) }
        }
        var moved: [(id: UInt64, sequence: OpenSequenceState)] = []
        var lost: [(id: UInt64, holders: [NodeID])] = []
        for (id, var sequence) in sequences.sorted(by: { $0.key < $1.key }) where only?.contains(id) ?? true {
            if sequence.shards.contains(where: { $0.holders.allSatisfy { dead.contains($0.node) } }) {
                // Announcing a new epoch to these holders' node ids could reach a later incarnation,
                // which would take it for a new, empty copy.
                _ = close(id)
                for node in dead { closeConfirmed(id, by: node) }
                lost.append((id, unconfirmedCloses[id].map { $0.sorted() } ?? []))
                continue
            }
            var changed = false
            for k in sequence.shards.indices {
                let holders = sequence.shards[k].holders
                let alive = holders.filter { !dead.contains($0.node) }
                guard alive.count != holders.count else { continue }
                changed = true
                sequence.shards[k].primary = alive[0]
                sequence.shards[k].replicas = Array(alive.dropFirst())
            }
            guard changed else { continue }
            sequence.epoch = nextEpoch(after: sequence.epoch)
            sequences[id] = sequence
            moved.append((id, sequence))
        }
        return (moved, lost)
    }

    /// Admits and places a new sequence: its layers split into `live ÷ replication` contiguous shards
    /// (at least one), each on `replication` distinct workers, rotated by sequence id.
    /// An id of 0 asks the coordinator to choose a free one (in the returned state's message).
    /// The same open again from the same tenant (a client's retry after a lost answer, or a frame
    /// delivered twice) gets the sequence as it is now once it is announced, and is told to retry
    /// while the first is still being announced; a different one with an id in use is refused.
    /// `trace` is the trace context the open came with.
    mutating func open(
        _ request: Tessera_V1_OpenSequence,
        trace: [String: String] = [:]
    ) throws(WireError) -> OpenSequenceState {
        guard !request.tenant.isEmpty else { throw WireError(.badRequest, "open_sequence.tenant must not be empty") }
        var message = request
        if message.sequenceID == 0 { message.sequenceID = freeSequenceID() }
        if let open = sequences[message.sequenceID] {
            guard open.message == message else {
                throw WireError(.badRequest, "sequence \(message.sequenceID) is already open")
            }
            guard open.announced else {
                throw WireError(
                    .unavailable,
                    "sequence \(message.sequenceID) is still being placed by an earlier open; retry",
                    retryAfter: .milliseconds(200)
                )
            }
            return open
        }
        // After a restart, until the workers have re-registered, the bytes they hold are not charged
        // yet: admitting now could take memory that copies of rebuilt sequences already hold.
        guard !(isRebuilding && replacesAnother) || weakened.contains(.rebuildBeforeAdmitting) else {
            throw stillRebuilding("it admits nothing until then")
        }
        guard !predecessorLeftNoView || weakened.contains(.rebuildBeforeAdmitting) else {
            throw WireError(
                .unavailable,
                "the coordinator restarted and no worker has reported its predecessor's membership view; "
                    + "until the workers' leases lapse, copies of workers not registered yet are not counted; retry",
                retryAfter: .seconds(1)
            )
        }
        let unheard = unheardFromPredecessor()
        guard unheard.isEmpty || weakened.contains(.rebuildBeforeAdmitting) else {
            throw WireError(
                .unavailable,
                "the coordinator restarted and has not heard from \(unheard.map(\.rawValue)) yet; until they "
                    + "register or their lease lapses, the copies they may hold are not counted; retry",
                retryAfter: .milliseconds(500)
            )
        }
        if let closing = unconfirmedCloses[message.sequenceID] {
            throw WireError(
                .unavailable,
                "sequence \(message.sequenceID) is still being closed on \(closing.sorted().map(\.rawValue)); retry",
                retryAfter: .milliseconds(500)
            )
        }
        let geometry = try ModelGeometry(proto: message.model)
        let layout = try PromptLayout(proto: message.spans)
        _ = try layout.checkedDecodeTokens(message.decodeTokens)
        let (policy, retention) = try CompressionPolicy.decode(proto: message.policy)
        // Each shard on `replication` distinct workers and no worker holding two shards of one
        // sequence: as many shards as whole replica sets fit, rotated by sequence id to spread load.
        let live = placeable
        guard !live.isEmpty else {
            throw WireError(
                .unavailable,
                "no live worker holds a shard yet; retry once workers have registered",
                retryAfter: .milliseconds(500)
            )
        }
        let copies = min(replication, live.count)
        let shardCount = min(max(1, live.count / copies), geometry.layers)
        let offset = Int(message.sequenceID % UInt64(live.count))
        let rotated = Array(live[offset...] + live[..<offset]).map {
            ShardHolder(node: $0, address: workers[$0]!.address)
        }
        let ranges = LayerSplit.ranges(layerCount: geometry.layers, shardCount: shardCount)
        let shards = ranges.enumerated().map { index, layers in
            let set = rotated[(index * copies)..<(index * copies + copies)]
            return SequenceShard(
                id: UInt32(index),
                layers: layers,
                primary: set.first!,
                replicas: Array(set.dropFirst())
            )
        }
        // Every copy is charged, as many as re-replication will make once workers join (not only the
        // ones placed now): the limit bounds what the workers hold together.
        let (estimate, decodeAllowance) = Self.charge(
            geometry,
            layout,
            decodeTokens: message.decodeTokens,
            copies: replication
        )
        switch admission.admit(tenant: message.tenant, sequenceID: message.sequenceID, estimatedBytes: estimate) {
        case .admitted: break
        case .refused(let reason, let retryAfterMillis):
            throw WireError(
                .resourceExhausted,
                "sequence \(message.sequenceID) refused: \(reason)",
                retryAfter: retryAfterMillis == 0 ? nil : .milliseconds(Int64(retryAfterMillis))
            )
        }
        let state = OpenSequenceState(
            tenant: message.tenant,
            geometry: geometry,
            layout: layout,
            message: message,
            policy: policy,
            epoch: nextEpoch(after: 0),
            shards: shards,
            budget: BudgetLifecycle(retention: retention),
            decodeAllowance: decodeAllowance,
            copies: replication,
            trace: trace
        )
        sequences[message.sequenceID] = state
        return state
    }

    /// Open sequences that no client connection has watched for `grace`: their client is gone (it
    /// crashed, or it lost them across a coordinator restart), so their lease is up.
    mutating func orphans(grace: Duration) -> [UInt64] {
        let now = elapsed()
        var expired: [UInt64] = []
        for id in sequences.keys.sorted() {
            guard watchers(of: id).isEmpty else {
                unwatchedSince[id] = nil
                continue
            }
            let since = unwatchedSince[id] ?? now
            unwatchedSince[id] = since
            if now - since >= grace { expired.append(id) }
        }
        return expired
    }

    /// Every holder of the sequence acknowledged its assignment (see `OpenSequenceState.announced`).
    mutating func announced(_ sequenceID: UInt64) { sequences[sequenceID]?.announced = true }

    /// Tells `connection` about later moves of the sequence (see `watchers(of:)`).
    mutating func watch(_ sequenceID: UInt64, from connection: Link) {
        guard sequences[sequenceID] != nil, watchers[sequenceID]?.contains(where: { $0 === connection }) != true
        else { return }
        watchers[sequenceID, default: []].append(connection)
    }

    /// The open connections watching the sequence; closed ones are dropped.
    mutating func watchers(of sequenceID: UInt64) -> [Link] {
        watchers[sequenceID]?.removeAll { $0.isClosed }
        return watchers[sequenceID] ?? []
    }

    /// The next id no sequence uses, counting up from 2^62 (far from the small ids clients choose
    /// themselves). It is taken at the moment of opening, so no other tenant can have squatted it.
    private mutating func freeSequenceID() -> UInt64 {
        while nextChosenID == 0 || sequences[nextChosenID] != nil || unconfirmedCloses[nextChosenID] != nil
            || admission.sequence(nextChosenID) != nil
        {
            nextChosenID &+= 1
        }
        defer { nextChosenID &+= 1 }
        return nextChosenID
    }

    /// The open sequence; with a tenant, only if that tenant owns it. While rebuilding, a sequence
    /// not heard of yet may still come back with its workers' registrations: UNAVAILABLE, not unknown
    /// (a client that took "unknown" for "closed" would leave its copies behind for good).
    func sequence(_ sequenceID: UInt64, tenant: String?) throws(WireError) -> OpenSequenceState {
        guard let state = sequences[sequenceID] else {
            if isRebuilding { throw stillRebuilding("sequence \(sequenceID) is not known yet") }
            throw WireError(.unknownSequence, "sequence \(sequenceID) is not open")
        }
        guard tenant == nil || state.tenant == tenant else {
            throw WireError(.wrongTenant, "sequence \(sequenceID) belongs to another tenant")
        }
        return state
    }

    /// Records a layer's statistics as `node` reported them; once every layer's are in, returns the
    /// first budget to assign, with the sequence as it stands (once: see `BudgetLifecycle`). Every copy
    /// reports the same statistics, and again after a coordinator restart: the first per layer is
    /// kept, so a rebuilt sequence that already has its budget gets them for tightening.
    ///
    /// Refused, changing nothing: statistics of a sequence not open, from a node that holds no copy
    /// of the layer (the first per layer wins, so anyone else's could skew the budgets), of another
    /// epoch (from before a failover, or forged after one: a copy that moved to the new epoch sends
    /// its statistics again stamped with it), or that do not fit the sequence's geometry.
    mutating func record(
        _ message: Tessera_V1_LayerStats,
        from node: NodeID
    ) throws(WireError) -> (sequence: OpenSequenceState, assign: BudgetLifecycle.Assign)? {
        let sequenceID = message.sequenceID
        var state = try sequence(sequenceID, tenant: nil)
        let layer = Int(message.layer)
        guard
            state.shards.contains(where: { $0.layers.contains(layer) && $0.holders.contains { $0.node == node } })
                || weakened.contains(.statisticsFromHolders)
        else {
            throw WireError(.permissionDenied, "\(node) holds no copy of layer \(layer) of sequence \(sequenceID)")
        }
        guard message.epoch == state.epoch else {
            throw WireError(
                .staleEpoch,
                "sequence \(sequenceID) is at epoch \(state.epoch), the statistics carry \(message.epoch)"
            )
        }
        let statistics = try LayerStatistics(proto: message, geometry: state.geometry)
        if state.statistics[statistics.layer] == nil { state.statistics[statistics.layer] = statistics }
        guard state.statistics.count == state.geometry.layers, let assign = state.budget.statisticsComplete() else {
            sequences[sequenceID] = state
            return nil
        }
        sequences[sequenceID] = state
        return (state, assign)
    }

    /// Ends an assignment. When every copy applied it, admission charges what the shards' primaries
    /// hold (replicas hold the same) plus room for the decode rows still to come, never more than
    /// before; otherwise the charge stays as it was (never below what the copies hold) and the
    /// assignment is retried.
    /// Returns the phase the sequence moved to; nil once it closed.
    mutating func finishAssignment(
        _ sequenceID: UInt64,
        everyCopyApplied: Bool,
        primaryBytes: UInt64,
        headRowShares: HeadRowShares? = nil
    ) -> BudgetLifecycle.Phase? {
        guard var sequence = sequences[sequenceID] else { return nil }
        let phase = sequence.budget.assignmentFinished(everyCopyApplied: everyCopyApplied, now: now)
        // Every copy answered this coordinator: later registrations no longer rebuild (or re-charge)
        // the sequence from what they report.
        if everyCopyApplied {
            sequence.restoredBytes = nil
            sequence.headRowShares = headRowShares
        }
        sequences[sequenceID] = sequence
        if everyCopyApplied {
            let reported = primaryBytes.saturatingProduct(UInt64(sequence.copies)).saturatingSum(
                sequence.decodeAllowance
            )
            // A tightening mid-decode: the primaries' bytes include the rows decoded since, which the
            // allowance covers already. Counted twice, they could raise the charge past what was
            // admitted against (tests saw the limit exceeded by 4%). A budget only takes prompt rows
            // away, so what was charged before still bounds what is held.
            let charged = admission.sequence(sequenceID)?.chargedBytes ?? reported
            _ = admission.record(sequenceID: sequenceID, kvBytes: min(reported, charged))
        }
        return phase
    }

    /// Assignments whose retry is due, with their sequences as they stand.
    mutating func dueAssignments() -> [(id: UInt64, sequence: OpenSequenceState, assign: BudgetLifecycle.Assign)] {
        let instant = now
        var due: [(id: UInt64, sequence: OpenSequenceState, assign: BudgetLifecycle.Assign)] = []
        for id in sequences.keys.sorted() {
            guard let assign = sequences[id]!.budget.tick(now: instant) else { continue }
            due.append((id, sequences[id]!, assign))
        }
        return due
    }

    /// What must be freed before a sequence of `estimate` bytes fits: under the memory limit, and
    /// under `tenant`'s quota.
    func shortfall(tenant: String, estimate: UInt64) -> (memory: UInt64, quota: UInt64) {
        var memory: UInt64 = 0
        if let available = admission.availableBytes, estimate > available { memory = estimate - available }
        let quota = admission.quotaBytes(forTenant: tenant)
        let used = admission.bytes(forTenant: tenant)
        let overQuota = quota != 0 && used + estimate > quota ? used + estimate - quota : 0
        return (memory, overQuota)
    }

    /// Compressed sequences that can still be tightened (above `floor`), largest charge first; only
    /// `tenant`'s when only its quota is short. Sequences with a copy in flight are left alone.
    func tightenable(floor: Double, tenant: String?) -> [UInt64] {
        sequences
            .filter {
                ($0.value.budget.compressedRetention ?? 0) > floor && (tenant == nil || $0.value.tenant == tenant)
                    && $0.value.statistics.count == $0.value.geometry.layers && !$0.value.budget.isCopying
            }
            .map(\.key)
            .sorted {
                let a = admission.sequence($0)?.chargedBytes ?? 0
                let b = admission.sequence($1)?.chargedBytes ?? 0
                return a != b ? a > b : $0 < $1
            }
    }

    /// Starts cutting a compressed sequence to half its retention (not below `floor`); returns it as
    /// it stands now with the assignment to make, or nil once it closed, while a copy of it is in
    /// flight, or while it is not compressed (another assignment is on its way).
    mutating func beginTightening(
        _ sequenceID: UInt64,
        floor: Double
    ) -> (sequence: OpenSequenceState, assign: BudgetLifecycle.Assign)? {
        guard var sequence = sequences[sequenceID],
            let held = sequence.budget.compressedRetention,
            let assign = sequence.budget.tighten(to: max(floor, held / 2))
        else { return nil }
        sequences[sequenceID] = sequence
        return (sequence, assign)
    }

    /// Live workers with a connection: where sequences can be placed.
    private var placeable: [NodeID] { membership.liveNodeIDs.filter { workers[$0] != nil }.sorted() }

    /// The estimate `open` charges for `message` with the workers live now.
    func estimate(_ message: Tessera_V1_OpenSequence) -> UInt64? {
        guard let geometry = try? ModelGeometry(proto: message.model),
            let layout = try? PromptLayout(proto: message.spans)
        else { return nil }
        let copies = min(replication, max(1, placeable.count))
        return Self.charge(geometry, layout, decodeTokens: message.decodeTokens, copies: copies).estimate
    }

    /// What admission charges a new sequence: while prefilled and not yet compressed it holds its full
    /// cache in Float32 on every copy, and decode then appends one row per token (the allowance).
    static func charge(
        _ g: ModelGeometry,
        _ layout: PromptLayout,
        decodeTokens: UInt32,
        copies: Int
    ) -> (estimate: UInt64, decodeAllowance: UInt64) {
        // Saturating: decode tokens are the client's number; a sum past UInt64 is refused as too large.
        let rowBytes = UInt64(2 * g.layers * g.kvHeads * g.headDim * 4).saturatingProduct(UInt64(copies))
        let decodeAllowance = rowBytes.saturatingProduct(UInt64(decodeTokens))
        return (rowBytes.saturatingProduct(UInt64(layout.promptLength)).saturatingSum(decodeAllowance), decodeAllowance)
    }

    /// Ends a sequence: it takes no more requests, but admission keeps charging it until every holder
    /// has dropped its copies (`closeConfirmed`), so that a sequence admitted meanwhile cannot make
    /// the workers hold more than the limit.
    mutating func close(_ sequenceID: UInt64) -> OpenSequenceState? {
        copyRetry[sequenceID] = nil
        watchers[sequenceID] = nil
        unwatchedSince[sequenceID] = nil
        rebuiltFrom[sequenceID] = nil
        guard let state = sequences.removeValue(forKey: sequenceID) else { return nil }
        // A worker yet to register may hold a copy the rebuild has not seen, at any epoch an earlier
        // coordinator gave (all below this one's): it must not bring the sequence back. (After the
        // rebuild, copies of unknown sequences are closed anyway.)
        if isRebuilding {
            closedThrough[sequenceID] = max(closedThrough[sequenceID] ?? 0, state.epoch, lastEpoch)
        }
        unconfirmedCloses[sequenceID] = Set(state.shards.flatMap { $0.holders.map(\.node) })
        if unconfirmedCloses[sequenceID]!.isEmpty { closeConfirmed(sequenceID, by: nil) }
        return state
    }

    /// A holder answered `close`: of a left-behind copy (it carries the copy's epoch), or of a closed
    /// sequence (see `closeConfirmed(_:by:)`).
    mutating func closeAnswered(_ close: Tessera_V1_Close, by nodeID: NodeID) {
        if close.epoch != 0 {
            if leftBehind[nodeID]?[close.sequenceID] == close.epoch { leftBehind[nodeID]![close.sequenceID] = nil }
        } else {
            closeConfirmed(close.sequenceID, by: nodeID)
        }
    }

    /// A holder dropped its copies of a closed sequence (it answered the Close, or it was declared
    /// dead); once none is left the sequence's charge is released.
    mutating func closeConfirmed(_ sequenceID: UInt64, by nodeID: NodeID?) {
        if let nodeID { unconfirmedCloses[sequenceID]?.remove(nodeID) }
        // Released once: a late second answer must not release a sequence opened under the id since.
        guard let remaining = unconfirmedCloses[sequenceID], remaining.isEmpty else { return }
        unconfirmedCloses[sequenceID] = nil
        _ = admission.release(sequenceID: sequenceID)
    }

    /// A holder declared dead confirms every close it owed: it rejoins holding nothing, and what it
    /// may hold meanwhile is reserved (`LapsingCopies`).
    private mutating func confirmCloses(by nodeID: NodeID) {
        for id in Array(unconfirmedCloses.keys) { closeConfirmed(id, by: nodeID) }
    }

    /// The Closes owed to connected workers: to holders of closed sequences that have not confirmed
    /// dropping them, and to holders of left-behind copies (with the copy's epoch).
    func owedCloses() -> [(holder: NodeID, close: Tessera_V1_Close)] {
        var owed: [(holder: NodeID, close: Tessera_V1_Close)] = []
        for id in unconfirmedCloses.keys.sorted() {
            for holder in unconfirmedCloses[id]!.sorted() where workers[holder] != nil {
                var close = Tessera_V1_Close()
                close.sequenceID = id
                owed.append((holder, close))
            }
        }
        for holder in leftBehind.keys.sorted() where workers[holder] != nil {
            for (id, epoch) in leftBehind[holder]!.sorted(by: { $0.key < $1.key }) {
                var close = Tessera_V1_Close()
                close.sequenceID = id
                close.epoch = epoch
                owed.append((holder, close))
            }
        }
        return owed
    }

    func connection(for nodeID: NodeID) throws(WireError) -> Link {
        guard let link = workers[nodeID] else {
            throw WireError(.unavailable, "worker \(nodeID) is not connected")
        }
        return link.connection
    }

    /// The connection to `nodeID` if it still holds a shard of the sequence at `epoch`; nil once the
    /// sequence moved on (a failover, or the node's restart as a new incarnation, which must not get
    /// the old incarnation's assignment).
    func connection(for nodeID: NodeID, holding sequenceID: UInt64, at epoch: UInt64) throws(WireError) -> Link? {
        guard let sequence = sequences[sequenceID], sequence.epoch == epoch,
            sequence.shards.contains(where: { $0.holders.contains { $0.node == nodeID } })
        else { return nil }
        return try connection(for: nodeID)
    }

    /// The coordinator's gauges for the Prometheus endpoint, for the service to record: bytes the
    /// workers report per modality, accounted bytes per tenant and policy (a label set that emptied
    /// since the last reading reads 0 rather than keeping its last value), open sequences, workers
    /// by state, the memory limit and under-replicated shards.
    mutating func gauges() -> CoordinatorGauges {
        var gauges = CoordinatorGauges(
            liveSequences: sequences.count,
            memoryLimitBytes: admission.memoryLimitBytes,
            underReplicatedShards: underReplicatedShards,
            workers: Dictionary(
                uniqueKeysWithValues: MemberState.allCases.map { state in
                    (state, membership.members.count { $0.state == state })
                }
            )
        )
        for (nodeID, link) in workers {
            let reported = link.kvBytesByModality.byModality
            for modality in ["text", "image", "video"] {
                gauges.kvBytes[CoordinatorGauges.NodeModality(node: nodeID.rawValue, modality: modality)] =
                    reported[modality] ?? 0
            }
        }
        for charge in admission.sequences {
            // A closed sequence stays charged until its holders confirm they dropped it.
            let policy = sequences[charge.sequenceID]?.policy.name ?? "closing"
            gauges.accounted[CoordinatorGauges.Account(tenant: charge.tenant, policy: policy), default: 0] +=
                charge.chargedBytes
        }
        for key in reportedAccounts.subtracting(gauges.accounted.keys) { gauges.accounted[key] = 0 }
        reportedAccounts = Set(gauges.accounted.keys)
        return gauges
    }

    /// The label sets `gauges` last reported.
    private var reportedAccounts: Set<CoordinatorGauges.Account> = []

    func accounted() -> (bytes: UInt64, sequences: [UInt64: UInt64]) {
        (
            admission.totalBytes,
            Dictionary(uniqueKeysWithValues: admission.sequences.map { ($0.sequenceID, $0.chargedBytes) })
        )
    }

    /// The cluster's status; with `includeSequences`, also the open sequences of `tenant` (of every
    /// tenant when nil).
    func status(includeSequences: Bool = false, tenant: String? = nil) -> Tessera_V1_StatusReply {
        var reply = Tessera_V1_StatusReply()
        let shards = sequences.values.flatMap(\.shards)
        for member in membership.members {
            var worker = Tessera_V1_WorkerStatus()
            worker.endpoint.nodeID = member.nodeID.rawValue
            worker.endpoint.host = member.address.host
            worker.endpoint.port = UInt32(member.address.port)
            worker.incarnation = member.incarnation
            worker.state =
                switch member.state {
                case .alive: .up
                case .suspect: .suspect
                case .dead: .dead
                }
            worker.primaryShards = UInt32(shards.count { $0.primary.node == member.nodeID })
            worker.replicaShards = UInt32(shards.count { $0.replicas.contains { $0.node == member.nodeID } })
            if member.state != .dead, let link = workers[member.nodeID] {
                worker.kvBytes = link.kvBytes
                worker.kvBytesByModality = link.kvBytesByModality
                worker.rssBytes = link.rssBytes
                worker.auditBytes = link.auditBytes
                worker.liveSequences = link.liveSequences
            }
            worker.memoryCapacityBytes = member.memoryCapacityBytes
            reply.workers.append(worker)
            reply.totalKvBytes = reply.totalKvBytes.saturatingSum(worker.kvBytes)
        }
        reply.sequenceCount = UInt32(sequences.count)
        reply.underReplicatedShards = UInt32(underReplicatedShards)
        reply.membershipVersion = membershipVersion
        reply.memoryCapacityBytes = admission.memoryLimitBytes
        reply.accountedKvBytes = admission.totalBytes.saturatingSum(admission.reservedBytes)
        if includeSequences {
            reply.sequences = sequences.filter { tenant == nil || $0.value.tenant == tenant }.sorted {
                $0.key < $1.key
            }.map { id, sequence in
                var status = Tessera_V1_SequenceStatus()
                status.tenant = sequence.tenant
                status.sequenceID = id
                status.state = sequence.budget.isCompressed ? .decoding : .prefilling
                status.promptLength = UInt32(sequence.layout.promptLength)
                // Charged for every copy; reported, as a worker reports one, per copy.
                status.kvBytes = (admission.sequence(id)?.chargedBytes ?? 0) / UInt64(max(1, sequence.copies))
                status.policy = sequence.policy.name
                status.retention = sequence.budget.compressedRetention ?? sequence.budget.retention
                status.epoch = sequence.epoch
                status.shardCount = UInt32(sequence.shards.count)
                if let shares = sequence.headRowShares { status.headRowShares = shares.proto }
                return status
            }
        }
        return reply
    }
}

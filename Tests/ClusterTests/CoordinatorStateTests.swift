import ClusterAdmin
import ClusterSecurity
import ClusterState
import ClusterTransport
import ClusterWire
import KVCacheCore
import Metrics
import Prometheus
import Synchronization
import Testing

@testable import Coordinator

/// A connection as the coordinator's state sees it: something to tell apart, which may close.
private final class TestLink: CoordinatorLink {
    private let closed = Atomic<Bool>(false)
    var isClosed: Bool { closed.load(ordering: .relaxed) }
    func close() { closed.store(true, ordering: .relaxed) }
}

/// The coordinator's time, moved by the test.
private final class ManualTime: Sendable {
    private let nanoseconds = Atomic<Int64>(0)
    var elapsed: Duration { .nanoseconds(nanoseconds.load(ordering: .relaxed)) }
    func advance(_ duration: Duration) {
        nanoseconds.add(duration.clampedNanoseconds, ordering: .relaxed)
    }
}

extension Duration {
    fileprivate var clampedNanoseconds: Int64 {
        Int64(components.seconds) * 1_000_000_000 + components.attoseconds / 1_000_000_000
    }
}

/// The coordinator's decisions without sockets or clocks: admission and the charge of a closing
/// sequence, budgets retried until every copy applied them, failover and the clients told of it.
struct CoordinatorStateTests {
    static let geometry = ModelGeometry.tiny
    static let layout = try! PromptLayout(spans: [
        ModalitySpan(.text, start: 0, count: 8), ModalitySpan(.image(0), start: 8, count: 24),
    ])

    private static func coordinator(
        limit: UInt64 = 0,
        replication: Int = 2,
        workers: Int = 3,
        time: ManualTime = ManualTime(),
        startsNewCluster: Bool = true
    ) throws -> CoordinatorState<TestLink> {
        let configuration = CoordinatorConfiguration(
            incarnation: 100,
            listen: NodeAddress(host: "127.0.0.1", port: 0),
            security: .insecure,
            memoryLimitBytes: limit,
            replication: replication,
            startsNewCluster: startsNewCluster
        )
        var state = try CoordinatorState<TestLink>(configuration: configuration, elapsed: { time.elapsed })
        for index in 0..<workers {
            _ = try state.register(registration(index + 1), connection: TestLink())
        }
        return state
    }

    static func registration(_ index: Int, holding held: [Tessera_V1_HeldShard] = []) -> Tessera_V1_RegisterWorker {
        var message = Tessera_V1_RegisterWorker()
        message.endpoint = endpoint(index)
        message.incarnation = 1
        message.heldShards = held
        return message
    }

    /// A membership view of `coordinator` counting incarnation 1 of each of `liveWorkers` as live.
    static func view(coordinator: UInt64, version: UInt64, liveWorkers: [Int]) -> Tessera_V1_MembershipView {
        var view = Tessera_V1_MembershipView()
        view.coordinatorIncarnation = coordinator
        view.version = version
        view.members = liveWorkers.map { index in
            var member = Tessera_V1_ViewMember()
            member.nodeID = "worker-\(index)"
            member.incarnation = 1
            return member
        }
        return view
    }

    static func endpoint(_ index: Int) -> Tessera_V1_Endpoint {
        var endpoint = Tessera_V1_Endpoint()
        endpoint.nodeID = "worker-\(index)"
        endpoint.host = "127.0.0.1"
        endpoint.port = UInt32(9000 + index)
        return endpoint
    }

    /// A compressed copy of the whole of sequence `id` at `epoch`, as its holder reports it when it
    /// registers: `primary` first, then `replicas` (worker indices).
    static func held(_ id: UInt64, epoch: UInt64, primary: Int, replicas: [Int]) throws -> Tessera_V1_HeldShard {
        let opening = try opening(id)
        var copy = Tessera_V1_HeldShard()
        copy.assignment.tenant = opening.tenant
        copy.assignment.sequenceID = id
        copy.assignment.epoch = epoch
        copy.assignment.model = opening.model
        copy.assignment.spans = opening.spans
        copy.assignment.policy = opening.policy
        copy.assignment.decodeTokens = opening.decodeTokens
        copy.assignment.shard.layerCount = UInt32(geometry.layers)
        copy.assignment.shard.primary = endpoint(primary)
        copy.assignment.shard.replicas = replicas.map(endpoint)
        copy.compressed = true
        copy.kvBytes = 1000
        return copy
    }

    static func opening(_ id: UInt64, decodeTokens: UInt32 = 4) throws -> Tessera_V1_OpenSequence {
        var message = Tessera_V1_OpenSequence()
        message.tenant = "t"
        message.sequenceID = id
        message.decodeTokens = decodeTokens
        message.model = try geometry.proto()
        message.spans = try layout.proto()
        message.policy = try CompressionPolicy.snapKV(.init()).proto(retention: 0.2)
        return message
    }

    /// What admission charges a sequence of `opening` on 2 copies before its budget.
    static let estimate = CoordinatorState<TestLink>.charge(geometry, layout, decodeTokens: 4, copies: 2).estimate

    /// Sequence 1's statistics of `layer`, as a worker reports them.
    static func statistics(layer: Int, epoch: UInt64, density: Double = 1) throws -> Tessera_V1_LayerStats {
        try LayerStatistics(layer: layer, promptLength: layout.promptLength, density: density, heads: [])
            .proto(sequenceID: 1, epoch: epoch)
    }

    @Test func aClosingSequenceStaysChargedUntilEveryHolderDroppedIt() async throws {
        var state = try Self.coordinator(limit: Self.estimate)
        let first = try state.open(Self.opening(1))
        let holders = first.shards.flatMap(\.holders).map(\.node)
        #expect(holders.count == 2)
        #expect { try state.open(Self.opening(2)) } throws: {
            ($0 as? WireError)?.code == .resourceExhausted
        }

        _ = state.close(1)
        // The workers may still hold it: nothing new fits yet, and the id is not free.
        #expect { try state.open(Self.opening(2)) } throws: {
            ($0 as? WireError)?.code == .resourceExhausted
        }
        #expect { try state.open(Self.opening(1)) } throws: {
            ($0 as? WireError)?.code == .unavailable && ($0 as? WireError)?.retryAfter != nil
        }
        state.closeConfirmed(1, by: holders[0])
        #expect(state.admission.totalBytes == Self.estimate)
        state.closeConfirmed(1, by: holders[1])
        #expect(state.admission.totalBytes == 0)

        // The id is free again; a late second answer to the old Close releases nothing of the new one.
        _ = try state.open(Self.opening(1))
        state.closeConfirmed(1, by: holders[1])
        #expect(state.admission.totalBytes == Self.estimate)
    }

    /// `LeaveCluster`: the worker's own incarnation is dead at once and its sequences move; another
    /// incarnation, or one already dead, changes nothing.
    @Test func aLeavingWorkerIsDeadAtOnceAndItsSequencesMove() async throws {
        var state = try Self.coordinator()
        let holders = try state.open(Self.opening(1)).shards.flatMap(\.holders).map(\.node)
        #expect(state.leave(holders[0], incarnation: 2) == nil)
        let left = state.leave(holders[0], incarnation: 1)
        let change = try #require(left)
        #expect(change.to == .dead)
        #expect(state.leave(holders[0], incarnation: 1) == nil)
        let (moved, lost) = state.failOver(dead: [holders[0]])
        #expect(moved.map(\.id) == [1] && lost.isEmpty)
        #expect(moved.allSatisfy { $0.sequence.shards.allSatisfy { !$0.holders.map(\.node).contains(holders[0]) } })
    }

    @Test func aHolderThatDiesConfirmsItsCloses() async throws {
        let time = ManualTime()
        var state = try Self.coordinator(time: time)
        let holders = try state.open(Self.opening(1)).shards.flatMap(\.holders).map(\.node)
        _ = state.close(1)
        state.closeConfirmed(1, by: holders[0])
        #expect(state.owedCloses().map(\.holder) == [holders[1]])
        // Only the other workers keep heartbeating; the silent holder is declared dead.
        try Self.pass(.seconds(5), on: &state, time: time, silent: [holders[1]])
        #expect(state.owedCloses().isEmpty)
        #expect(state.admission.totalBytes == 0)
    }

    /// The gauges an operator reads: accounted bytes by tenant and policy (a label set that emptied
    /// reads 0, not its last value), the limit, workers by state.
    @Test func theMetricsShowWhatEachTenantAndPolicyIsCharged() async throws {
        let registry = PrometheusCollectorRegistry()
        var state = try Self.coordinator(limit: 3 * Self.estimate)
        try withMetricsFactory(MetricsBootstrap.makeFactory(registry: registry)) {
            let holders = try state.open(Self.opening(1)).shards.flatMap(\.holders).map(\.node)
            state.gauges().record()
            var exposition = registry.emitToString()
            #expect(exposition.contains(#"tessera_accounted_kv_bytes{tenant="t",policy="snapkv"} \#(Self.estimate)"#))
            #expect(exposition.contains("tessera_memory_limit_bytes \(3 * Self.estimate)"))
            #expect(exposition.contains(#"tessera_workers{state="alive"} 3"#))
            #expect(exposition.contains(#"tessera_workers{state="dead"} 0"#))

            _ = state.close(1)
            state.gauges().record()
            exposition = registry.emitToString()
            // Closed, but charged until its holders confirm.
            #expect(exposition.contains(#"tessera_accounted_kv_bytes{tenant="t",policy="closing"} \#(Self.estimate)"#))
            #expect(exposition.contains(#"tessera_accounted_kv_bytes{tenant="t",policy="snapkv"} 0"#))
            for holder in holders { state.closeConfirmed(1, by: holder) }
            state.gauges().record()
            #expect(registry.emitToString().contains(#"tessera_accounted_kv_bytes{tenant="t",policy="closing"} 0"#))
        }
    }

    /// Lets `duration` pass in steps of 100 ms, every worker but `silent` heartbeating, and ticks.
    private static func pass(
        _ duration: Duration,
        on state: inout CoordinatorState<TestLink>,
        time: ManualTime,
        silent: Set<NodeID>
    ) throws {
        for _ in 0..<Int(duration / .milliseconds(100)) {
            time.advance(.milliseconds(100))
            for index in 1...3 where !silent.contains(NodeID("worker-\(index)")) {
                var beat = Tessera_V1_Heartbeat()
                beat.incarnation = 1
                try state.heartbeat(beat, from: NodeID("worker-\(index)"), on: TestLink())
            }
            _ = state.tick()
        }
    }

    /// A worker declared dead may only be cut off, still holding its copies: they stay reserved out
    /// of the memory limit until its lease lapses (twice the lease after its last heartbeat, since it
    /// drops them within one), or until it registers as a new incarnation.
    @Test func aDeadWorkersCopiesStayReservedUntilItsLeaseLapses() async throws {
        let time = ManualTime()
        var state = try Self.coordinator(limit: 2 * Self.estimate, time: time)
        let holders = try state.open(Self.opening(1)).shards[0].holders.map(\.node)
        let holder = holders[0]
        _ = state.close(1)
        state.closeConfirmed(1, by: holders[1])
        try Self.pass(.seconds(5), on: &state, time: time, silent: [holder])
        #expect(state.admission.totalBytes == 0, "the close is confirmed by the death")
        #expect(state.admission.reservedBytes == Self.estimate / 2, "one copy of two")

        try Self.pass(.seconds(50), on: &state, time: time, silent: [holder])
        #expect(state.admission.reservedBytes == Self.estimate / 2)
        try Self.pass(.seconds(6), on: &state, time: time, silent: [holder])
        #expect(state.admission.reservedBytes == 0, "60 s after its last heartbeat")

        // A restart (a later incarnation) ends the reservation at once.
        _ = try state.open(Self.opening(2))
        let next = try state.sequence(2, tenant: nil).shards[0].primary.node
        try Self.pass(.seconds(5), on: &state, time: time, silent: [holder, next])
        #expect(state.admission.reservedBytes > 0)
        var again = Self.registration(Int(next.rawValue.dropFirst("worker-".count))!)
        again.incarnation = 2
        _ = try state.register(again, connection: TestLink())
        #expect(state.admission.reservedBytes == 0)
    }

    /// A restarted coordinator learns from the workers' membership views which workers its
    /// predecessor had given up: their copies may be of sequences closed since, so nothing is rebuilt
    /// from them, whichever registers first.
    @Test func copiesOfAWorkerAnEarlierCoordinatorGaveUpAreNotRebuiltFrom() async throws {
        let view = Self.view(coordinator: 1, version: 4, liveWorkers: [2, 3])
        // The view arrives first: worker-1, holding copies, is refused; it drops them and rejoins.
        let time = ManualTime()
        var state = try Self.coordinator(workers: 0, time: time, startsNewCluster: false)
        var counted = Self.registration(2)
        counted.lastView = view
        _ = try state.register(counted, connection: TestLink())
        let stale = Self.registration(1, holding: [try Self.held(7, epoch: 10, primary: 1, replicas: [])])
        #expect { _ = try state.register(stale, connection: TestLink()) } throws: {
            ($0 as? WireError)?.code == .staleEpoch
        }
        var empty = Self.registration(1)
        empty.incarnation = 2
        _ = try state.register(empty, connection: TestLink())

        // worker-1 registers first: its sequence is rebuilt, then forgotten once the view arrives, and
        // worker-1 is declared dead at the next tick.
        var other = try Self.coordinator(workers: 0, time: time, startsNewCluster: false)
        _ = try other.register(stale, connection: TestLink())
        #expect(other.admission.totalBytes > 0)
        _ = try other.register(counted, connection: TestLink())
        #expect(other.admission.totalBytes == 0)
        #expect { _ = try other.sequence(7, tenant: nil) } throws: {
            ($0 as? WireError)?.code == .unavailable
        }
        #expect(other.tick().changes.map(\.nodeID) == [NodeID("worker-1")])
    }

    /// A worker that restarted after the inherited view was taken (a newer incarnation than the view
    /// lists) was never given up by that view's coordinator: it is neither declared dead when the
    /// view arrives nor refused with the copies it holds.
    @Test func aWorkerRestartedSinceTheViewStaysLive() async throws {
        let view = Self.view(coordinator: 1, version: 4, liveWorkers: [1, 2])
        var state = try Self.coordinator(workers: 0, startsNewCluster: false)
        var restarted = Self.registration(1, holding: [try Self.held(7, epoch: 10, primary: 1, replicas: [])])
        restarted.incarnation = 2
        _ = try state.register(restarted, connection: TestLink())
        var reporting = Self.registration(2)
        reporting.lastView = view
        _ = try state.register(reporting, connection: TestLink())
        #expect(state.tick().changes.isEmpty)
        #expect(state.admission.totalBytes > 0)

        // Registering after the view arrived, with copies, it is taken too.
        var other = try Self.coordinator(workers: 0, startsNewCluster: false)
        _ = try other.register(reporting, connection: TestLink())
        _ = try other.register(restarted, connection: TestLink())
        #expect(other.admission.totalBytes > 0)
    }

    /// A coordinator replacing another that hears from no worker within the rebuild grace (its links
    /// slow, every frame held) keeps rebuilding until the grace has passed after the first one
    /// registers: it neither admits into memory it cannot see nor closes the copies it then hears of.
    @Test func theRebuildRunsFromTheFirstRegistrationWhenTheLinksAreSlow() async throws {
        let time = ManualTime()
        var state = try Self.coordinator(workers: 0, time: time, startsNewCluster: false)
        time.advance(.seconds(10))
        #expect(state.isRebuilding)
        _ = try state.register(
            Self.registration(1, holding: [try Self.held(7, epoch: 10, primary: 1, replicas: [])]),
            connection: TestLink()
        )
        _ = try state.register(Self.registration(2), connection: TestLink())
        #expect { _ = try state.open(Self.opening(8)) } throws: {
            ($0 as? WireError)?.code == .unavailable
        }
        #expect(state.admission.totalBytes > 0, "the copy reported late is rebuilt, not closed")
        time.advance(.seconds(4))
        #expect(!state.isRebuilding)
    }

    /// A coordinator replacing one that left no membership view (no registering worker reports one)
    /// cannot know which workers may still hold copies: it admits nothing until their leases lapse,
    /// and admits as soon as a view arrives whose workers have all registered.
    @Test func noViewFromThePredecessorHoldsAdmissionForTheLease() async throws {
        let time = ManualTime()
        var state = try Self.coordinator(workers: 2, time: time, startsNewCluster: false)
        time.advance(.seconds(10))
        #expect(!state.isRebuilding)
        #expect { _ = try state.open(Self.opening(8)) } throws: {
            ($0 as? WireError)?.message.contains("membership view") == true
        }
        time.advance(.seconds(60))  // twice the default lease of 30 s
        _ = try state.open(Self.opening(8))
    }

    /// A sequence closed while the rebuild is still going on stays closed: a copy reported later by
    /// a worker that registers only then (a re-replicated copy the closing coordinator did not know)
    /// is told to go, and nothing is charged for it.
    @Test func aSequenceClosedDuringTheRebuildIsNotRebuiltFromALaterCopy() async throws {
        var state = try Self.coordinator(workers: 0, startsNewCluster: false)
        _ = try state.register(
            Self.registration(1, holding: [try Self.held(7, epoch: 10, primary: 1, replicas: [])]),
            connection: TestLink()
        )
        #expect(state.close(7) != nil)
        state.closeConfirmed(7, by: NodeID("worker-1"))
        let late = try state.register(
            Self.registration(2, holding: [try Self.held(7, epoch: 10, primary: 1, replicas: [2])]),
            connection: TestLink()
        )
        #expect(late.staleCopies.map(\.sequenceID) == [7])
        #expect(state.admission.totalBytes == 0)
    }

    /// A worker that dropped a sequence on a Close says so when it registers: a copy another worker
    /// kept (its Close never arrived) does not bring the sequence back after a coordinator restart.
    @Test func aSequenceAWorkerReportsClosedIsNotRebuilt() async throws {
        var closed = Tessera_V1_ClosedSequence()
        closed.sequenceID = 7
        closed.epoch = 10
        var reporting = Self.registration(2)
        reporting.closedSequences = [closed]
        let keeping = Self.registration(1, holding: [try Self.held(7, epoch: 10, primary: 1, replicas: [2])])

        for order in [[keeping, reporting], [reporting, keeping]] {
            var state = try Self.coordinator(workers: 0, startsNewCluster: false)
            var stale: [Tessera_V1_Close] = []
            for registration in order {
                stale += try state.register(registration, connection: TestLink()).staleCopies
            }
            // worker-1 is told (worker-2 too, as a holder its assignment names: harmless).
            let owed = stale + (state.owedCloses().map(\.close))
            #expect(!owed.isEmpty && owed.allSatisfy { $0.sequenceID == 7 && $0.epoch == 10 })
            #expect(state.admission.totalBytes == 0)
        }
    }

    @Test func aCopyARebuildSupersedesIsToldToCloseUpToItsEpoch() async throws {
        // A restarted coordinator hears first from worker-1, holding sequence 7 at epoch 10 with
        // worker-2 as its replica; then from worker-2, which a failover since made the only holder, at 11.
        var state = try Self.coordinator(workers: 0, startsNewCluster: false)
        let first = try state.register(
            Self.registration(1, holding: [Self.held(7, epoch: 10, primary: 1, replicas: [2])]),
            connection: TestLink()
        )
        #expect(first.staleCopies.isEmpty)
        let second = try state.register(
            Self.registration(2, holding: [Self.held(7, epoch: 11, primary: 2, replicas: [])]),
            connection: TestLink()
        )
        #expect(second.staleCopies.isEmpty)
        #expect(try state.sequence(7, tenant: "t").shards.flatMap(\.holders).map(\.node) == [NodeID("worker-2")])

        let owed = state.owedCloses()
        #expect(owed.map(\.holder) == [NodeID("worker-1")])
        #expect(owed.map(\.close.sequenceID) == [7] && owed.map(\.close.epoch) == [10])
        state.closeAnswered(owed[0].close, by: NodeID("worker-1"))
        #expect(state.owedCloses().isEmpty)
    }

    @Test func statisticsAreTakenOnlyFromAHolderOfTheLayerAtTheSequencesEpoch() async throws {
        var state = try Self.coordinator()
        let opened = try state.open(Self.opening(1))
        let shard = try #require(opened.shards.first { $0.layers.contains(0) })
        let holder = shard.primary.node
        let outsider = try #require(
            (1...3).map { NodeID("worker-\($0)") }.first { worker in !shard.holders.contains { $0.node == worker } },
            "a registered worker that holds no copy of layer 0"
        )
        let refusals: [(Tessera_V1_LayerStats, NodeID, WireError.Code)] = [
            (try Self.statistics(layer: 0, epoch: opened.epoch, density: 0), outsider, .permissionDenied),
            (try Self.statistics(layer: 0, epoch: opened.epoch + 1, density: 0), holder, .staleEpoch),
            (try Self.statistics(layer: Self.geometry.layers, epoch: opened.epoch), holder, .permissionDenied),
        ]
        for (message, node, code) in refusals {
            #expect("\(node): layer \(message.layer), epoch \(message.epoch)") {
                try state.record(message, from: node)
            } throws: {
                ($0 as? WireError)?.code == code
            }
        }
        // Nothing refused was kept: the holder's own statistics are the ones the budget comes from.
        for layer in 0..<Self.geometry.layers {
            _ = try state.record(Self.statistics(layer: layer, epoch: opened.epoch), from: holder)
        }
        let kept = try state.sequence(1, tenant: nil).statistics
        #expect(kept.count == Self.geometry.layers && kept.values.allSatisfy { $0.density == 1 })
    }

    @Test func aBudgetAnyCopyMissedIsSentAgainUntilEveryCopyAppliedIt() async throws {
        let time = ManualTime()
        var state = try Self.coordinator(time: time)
        let opened = try state.open(Self.opening(1))
        let holder = opened.shards[0].primary.node
        var assignment: BudgetLifecycle.Assign?
        for layer in 0..<Self.geometry.layers {
            #expect(assignment == nil, "the budget goes out once every layer is in")
            assignment = try state.record(Self.statistics(layer: layer, epoch: opened.epoch), from: holder)?.assign
        }
        #expect(assignment == BudgetLifecycle.Assign(retention: 0.2))
        #expect(try state.record(Self.statistics(layer: 0, epoch: opened.epoch), from: holder) == nil, "only once")

        // One copy did not apply it: the charge stays the full estimate, and it is not tightenable.
        let phase = state.finishAssignment(1, everyCopyApplied: false, primaryBytes: 0)
        #expect(phase == .retrying(retention: 0.2, attempt: 1, due: ClusterInstant.zero + .milliseconds(250)))
        #expect(state.admission.totalBytes == Self.estimate)
        #expect(state.tightenable(floor: 0.02, tenant: nil).isEmpty)
        #expect(state.dueAssignments().isEmpty)
        time.advance(.milliseconds(250))
        let due = state.dueAssignments()
        #expect(due.map { $0.id } == [1] && due.map { $0.assign } == [BudgetLifecycle.Assign(retention: 0.2)])
        #expect(state.dueAssignments().isEmpty, "one assignment in flight")

        _ = state.finishAssignment(1, everyCopyApplied: true, primaryBytes: 1000)
        let decodeAllowance = CoordinatorState<TestLink>.charge(
            Self.geometry,
            Self.layout,
            decodeTokens: 4,
            copies: 2
        ).decodeAllowance
        #expect(state.admission.totalBytes == 2 * 1000 + decodeAllowance, "both copies hold the primary's bytes")
        #expect(state.tightenable(floor: 0.02, tenant: nil) == [1])
        // A tightening that fails goes back to be retried at the tighter retention.
        let begun = state.beginTightening(1, floor: 0.02)
        let tightening = try #require(begun)
        #expect(tightening.assign == BudgetLifecycle.Assign(retention: 0.1))
        #expect(state.beginTightening(1, floor: 0.02) == nil, "not twice at once")
        _ = state.finishAssignment(1, everyCopyApplied: false, primaryBytes: 0)
        time.advance(.milliseconds(250))
        #expect(state.dueAssignments().map { $0.assign } == [BudgetLifecycle.Assign(retention: 0.1)])
        // Applied mid-decode, the primary holds fewer prompt rows but the rows decoded since, which
        // the allowance covers already: the charge does not grow past what was admitted against.
        _ = state.finishAssignment(1, everyCopyApplied: true, primaryBytes: 1200)
        #expect(state.admission.totalBytes == 2 * 1000 + decodeAllowance)
        #expect(state.beginTightening(1, floor: 0.02) != nil)
        _ = state.finishAssignment(1, everyCopyApplied: true, primaryBytes: 600)
        #expect(state.admission.totalBytes == 2 * 600 + decodeAllowance, "a smaller one is charged")
    }

    @Test func clientsWatchingASequenceAreToldOfItsFailover() async throws {
        var state = try Self.coordinator()
        let opened = try state.open(Self.opening(1))
        let (opener, asker, gone) = (TestLink(), TestLink(), TestLink())
        for link in [opener, asker, gone, opener] { state.watch(1, from: link) }
        gone.close()
        #expect(state.watchers(of: 1).map(ObjectIdentifier.init) == [opener, asker].map(ObjectIdentifier.init))
        state.watch(2, from: opener)
        #expect(state.watchers(of: 2).isEmpty, "only open sequences are watched")

        let primary = opened.shards[0].primary.node
        let (moved, lost) = state.failOver(dead: [primary])
        #expect(lost.isEmpty && moved.map { $0.id } == [1])
        #expect(moved[0].sequence.epoch == opened.epoch + 1 && moved[0].sequence.shards[0].primary.node != primary)
        _ = state.close(1)
        #expect(state.watchers(of: 1).isEmpty)
    }

    /// A sequence with a shard that lost every copy is closed, not moved: announcing a new epoch to
    /// the dead holders' node ids could reach a later incarnation, which would take it for a new,
    /// empty copy. The holders of its other shards are to be told.
    @Test func aSequenceThatLostEveryCopyOfAShardIsClosed() async throws {
        var state = try Self.coordinator()
        let opened = try state.open(Self.opening(1))
        let dead = Set(opened.shards[0].holders.map(\.node))
        let (moved, lost) = state.failOver(dead: dead)
        #expect(moved.isEmpty && lost.map(\.id) == [1])
        let others = Set(opened.shards.flatMap(\.holders).map(\.node)).subtracting(dead)
        #expect(Set(lost[0].holders) == others)
        #expect(state.owedCloses().map(\.holder).allSatisfy { others.contains($0) })
        #expect(state.sequences[1] == nil)
    }

    /// A rebuilt placement names holders by node id; a worker that restarted since registers without
    /// the copies its earlier incarnation held, and the sequences naming it are failed over off it.
    @Test func aRestartedWorkerIsNotTakenForTheHolderOfItsEarlierCopies() async throws {
        var state = try Self.coordinator(workers: 0, startsNewCluster: false)
        _ = try state.register(
            Self.registration(2, holding: [Self.held(7, epoch: 10, primary: 1, replicas: [2])]),
            connection: TestLink()
        )
        var restarted = Self.registration(1)
        restarted.incarnation = 2
        let registered = try state.register(restarted, connection: TestLink())
        #expect(registered.lostCopies == [NodeID("worker-1"): [7]])
        let (moved, _) = state.failOver(dead: [NodeID("worker-1")], only: [7])
        #expect(moved.map(\.id) == [7])
        #expect(moved[0].sequence.shards[0].holders.map(\.node) == [NodeID("worker-2")])
        #expect(moved[0].sequence.epoch > 10)
    }

    /// The same in the other order (simulation seed 2707 of crash, partition, stall and pause): the
    /// restarted worker registers first, with nothing, then another reports a copy whose assignment
    /// names it. It was later promoted to primary of a copy it never had, and the rebuild after the
    /// next restart charged that empty, uncompressed copy its full size, past the memory limit.
    @Test func aWorkerThatRegisteredWithoutACopyIsNotTakenForItsHolder() async throws {
        var state = try Self.coordinator(workers: 0, startsNewCluster: false)
        var restarted = Self.registration(1)
        restarted.incarnation = 2
        #expect(try state.register(restarted, connection: TestLink()).lostCopies.isEmpty)
        let reporting = try state.register(
            Self.registration(2, holding: [Self.held(7, epoch: 10, primary: 1, replicas: [2])]),
            connection: TestLink()
        )
        #expect(reporting.lostCopies == [NodeID("worker-1"): [7]])
        // A worker named as holder that has not registered yet may still report the copy: not lost.
        var other = try Self.coordinator(workers: 0, startsNewCluster: false)
        let first = try other.register(
            Self.registration(2, holding: [Self.held(7, epoch: 10, primary: 1, replicas: [2])]),
            connection: TestLink()
        )
        #expect(first.lostCopies.isEmpty)
    }

    /// While a copy of a sequence is being made, a worker that holds no shard of it and reports an
    /// older copy (one failed over while it was away) is told to drop it: only a copy at the
    /// sequence's epoch can be the one in progress. A copy that finishes after its sequence closed is
    /// owed a Close, retried until answered.
    @Test func copiesAroundAReplicationInProgressAreClosed() async throws {
        let time = ManualTime()
        var state = try Self.coordinator(workers: 0, time: time, startsNewCluster: false)
        _ = try state.register(
            Self.registration(1, holding: [try Self.held(7, epoch: 10, primary: 1, replicas: [])]),
            connection: TestLink()
        )
        _ = try state.register(Self.registration(2), connection: TestLink())
        time.advance(.seconds(4))
        let plans = state.replicationPlans(limit: 1)
        #expect(plans.map(\.sequenceID) == [7] && plans.first?.target.node == NodeID("worker-2"))

        let older = try state.register(
            Self.registration(3, holding: [try Self.held(7, epoch: 9, primary: 3, replicas: [])]),
            connection: TestLink()
        )
        #expect(older.staleCopies.map(\.sequenceID) == [7] && older.staleCopies.map(\.epoch) == [9])

        #expect(state.close(7) != nil)
        #expect(state.finishCopy(plans[0], succeeded: true) == false)
        let owed = state.owedCloses().filter { $0.holder == NodeID("worker-2") }.map(\.close)
        #expect(owed.map(\.sequenceID) == [7] && owed.map(\.epoch) == [10])
    }

    /// Id 0 lets the coordinator choose: ids no sequence uses, so no tenant can squat them beforehand.
    @Test func theCoordinatorChoosesFreeIdsForIdZero() async throws {
        var state = try Self.coordinator()
        // A tenant takes the id the coordinator would choose next.
        _ = try state.open(Self.opening(1 << 62))
        let first = try state.open(Self.opening(0)).message.sequenceID
        let second = try state.open(Self.opening(0)).message.sequenceID
        #expect(first == (1 << 62) + 1 && second == first + 1)
        #expect(state.sequences.keys.sorted() == [1 << 62, first, second])
        #expect(state.admission.sequence(first) != nil, "charged under the chosen id")
    }

    /// Workers reserve room for every declared decode row, so a declaration past the bound on
    /// positions is refused at the open, before anything is charged or placed.
    @Test func decodeTokensPastTheBoundOnPositionsAreRefused() async throws {
        var state = try Self.coordinator()
        let allowed = PromptLayout.defaultMaxWirePromptLength - Self.layout.promptLength
        let refused = #expect(throws: WireError.self) {
            try state.open(Self.opening(1, decodeTokens: UInt32(allowed + 1)))
        }
        #expect(refused?.code == .invalidValue)
        #expect(
            refused?.message.hasPrefix("decode_tokens must be at most \(allowed)") == true,
            "\(refused?.message ?? "")"
        )
        #expect(state.sequences.isEmpty && state.admission.sequence(1) == nil)
        _ = try state.open(Self.opening(2, decodeTokens: UInt32(allowed)))
        #expect(state.sequences[2] != nil)
    }
}

extension CoordinatorStateTests {
    /// The same open again (a retry after a lost answer) is told to retry while the first is being
    /// announced, then gets the sequence as it stands, charged once; another open under the id is
    /// refused.
    @Test func aRepeatedOpenGetsTheSequenceOnceItIsAnnounced() async throws {
        var state = try Self.coordinator()
        let opening = try Self.opening(7)
        let first = try state.open(opening)
        #expect(!first.announced)
        do {
            _ = try state.open(opening)
            Issue.record("a repeat was answered before the first open was announced")
        } catch {
            #expect(error.code == .unavailable && error.retryAfter != nil, "\(error)")
        }
        state.announced(7)
        let again = try state.open(opening)
        #expect(
            again.announced && again.epoch == first.epoch
                && again.shards.map(\.primary.node) == first.shards.map(\.primary.node)
        )
        #expect(state.admission.sequence(7)?.chargedBytes == Self.estimate, "charged once")
        var other = opening
        other.decodeTokens = 9
        do {
            _ = try state.open(other)
            Issue.record("a different open under an id in use was answered")
        } catch {
            #expect(error.code == .badRequest && error.message.contains("already open"), "\(error)")
        }
    }
}

extension CoordinatorStateTests {
    /// A worker's shards in the status are the copies the open sequences' placements give it, and
    /// the membership version moves with registrations.
    @Test func theStatusCountsEachWorkersShardsFromThePlacements() async throws {
        var state = try Self.coordinator(workers: 4)
        let before = state.status()
        #expect(before.workers.allSatisfy { $0.primaryShards == 0 && $0.replicaShards == 0 })
        #expect(before.membershipVersion == 4, "one per registration")
        var placed: [OpenSequenceState] = []
        for id in [7, 8, 9] as [UInt64] { placed.append(try state.open(Self.opening(id))) }
        let status = state.status()
        for worker in status.workers {
            let node = NodeID(worker.endpoint.nodeID)
            let shards = placed.flatMap(\.shards)
            #expect(Int(worker.primaryShards) == shards.count { $0.primary.node == node }, "\(node)")
            #expect(Int(worker.replicaShards) == shards.count { $0.replicas.contains { $0.node == node } }, "\(node)")
        }
        #expect(status.workers.reduce(0) { $0 + $1.primaryShards } == 6, "3 sequences × 2 shards (4 workers, 2 copies)")
    }
}

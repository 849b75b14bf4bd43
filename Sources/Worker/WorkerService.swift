import ClusterAdmin
import ClusterSecurity
package import ClusterTransport
import ClusterWire
import Dispatch
import KVCacheCore
public import Logging
import Metrics
import NIOCore
import NIOPosix
import Synchronization
import Workloads

/// A worker process: holds shards of sequences' KV caches, computes their prefill statistics,
/// compresses them to the budgets the coordinator assigns, and serves decode attention. Clients talk
/// to it directly on its data port; it keeps one connection to the coordinator for registration,
/// heartbeats, layer statistics and the coordinator's pushes.
public final class WorkerService: Sendable {
    public let configuration: WorkerConfiguration
    let logger: Logger
    let store = SequenceStore()
    /// The counters and timers of prefills and compressions, by policy.
    let metrics = MetricHandles()
    /// The cores tensor work may use, read once: `System.coreCount` reads sysfs and cgroup files on
    /// every call, which was two file reads per prefill frame and per decode step.
    static let cores = System.coreCount
    /// Nil when simulated: many workers share one thread, and tensor work runs where it is asked for.
    private let threads: ComputeThreads?
    /// Where it listens and connects, and the clock of its loops.
    let network: any Network
    private let trimming = Atomic<Bool>(false)
    private let retainedPages = Mutex(RetainedPages())
    private let coordinatorLink = Mutex<PeerConnection?>(nil)
    /// Set once this incarnation asked to leave: a refusal as dead then ends it instead of a rejoin.
    private let leaving = Mutex(false)
    /// Layer statistics for the coordinator, as reported together (a shard's layers at once).
    private let statisticsOutbox = AsyncStream.makeStream(of: [Tessera_V1_LayerStats].self)
    /// Connections to other workers, for forwarding writes to replicas; set while `run` runs.
    private let peers = Mutex<ConnectionPool?>(nil)
    private let boundPort = Mutex<Int?>(nil)
    /// Starts at the configured incarnation; a worker the coordinator declared dead drops what it held
    /// and rejoins as the next one.
    private let currentIncarnation: Mutex<UInt64>
    /// The incarnation of the coordinator that last accepted this worker's registration (0: none yet).
    private let lastCoordinator = Mutex<UInt64>(0)
    /// The newest membership view a coordinator sent (see `Tessera_V1_MembershipView`).
    private let lastView = Mutex<Tessera_V1_MembershipView?>(nil)
    /// The coordinator's lease on this worker's copies (see `Tessera_V1_RegisterAck.leaseMillis`):
    /// its length, and when the last acknowledged registration or heartbeat was sent (`uptime`).
    private let lease = Mutex<(length: Duration, confirmedAt: Duration)?>(nil)
    /// Time since the service was made, on its network's clock.
    private let uptime: @Sendable () -> Duration
    /// Resident bytes once the service started, before it held anything (code, stacks, runtime).
    private let baseResidentBytes = Mutex<UInt64>(0)

    /// A worker process of its own: tensor work on its own threads, over TCP.
    public convenience init(configuration: WorkerConfiguration, logger: Logger) {
        self.init(
            configuration: configuration,
            logger: logger,
            network: TCPNetwork(
                security: configuration.security,
                maxFrameBytes: configuration.maxFrameBytes,
                faults: configuration.faults
            ),
            threads: ComputeThreads()
        )
    }

    /// - Parameter threads: nil runs tensor work inline and leaves the process's memory alone (the
    ///   simulator runs several workers in one process).
    package init(configuration: WorkerConfiguration, logger: Logger, network: any Network, threads: ComputeThreads?) {
        self.configuration = configuration
        self.network = network
        self.threads = threads
        var logger = logger
        logger[metadataKey: "node.id"] = "\(configuration.nodeID)"
        logger[metadataKey: "node.role"] = "worker"
        self.logger = logger
        currentIncarnation = Mutex(configuration.incarnation)
        uptime = network.elapsedTime()
    }

    var incarnation: UInt64 { currentIncarnation.withLock { $0 } }

    /// The threads one piece of tensor work of `kind` may split across: every core, or the calling
    /// thread alone when simulated.
    func team(_ kind: Work) -> ThreadTeam { threads?.team(kind) ?? .single }

    var identity: NodeIdentity {
        NodeIdentity(role: .worker, nodeID: configuration.nodeID, incarnation: incarnation)
    }

    /// Serves until cancelled. `onReady` gets the bound data port once the coordinator has accepted
    /// the registration.
    public func run(onReady: @escaping @Sendable (Int) async -> Void = { _ in }) async throws {
        try configuration.security.check(local: identity)
        if let threads {
            ProcessMemory.reuseLargeFrees()
            threads.start()
            baseResidentBytes.withLock { $0 = ProcessMemory.residentBytes() }
        }
        defer { threads?.shutdown() }
        try await ConnectionPool.withPool(
            network: network,
            handshake: Handshake(local: identity, acceptedPeerRoles: [.worker]),
            logger: logger
        ) { pool in
            self.peers.withLock { $0 = pool }
            defer { self.peers.withLock { $0 = nil } }
            try await self.serve(onReady: onReady)
        }
    }

    private func serve(onReady: @escaping @Sendable (Int) async -> Void) async throws {
        let (portStream, portContinuation) = AsyncStream.makeStream(of: Int.self)
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask {
                try await self.network.listen(
                    on: self.configuration.listen,
                    handshake: Handshake(local: self.identity),
                    handler: WorkerHandler(worker: self),
                    logger: self.logger
                ) { port in
                    self.boundPort.withLock { $0 = port }
                    portContinuation.yield(port)
                    portContinuation.finish()
                }
            }
            var ports = portStream.makeAsyncIterator()
            guard let port = await ports.next() else { return }
            group.addTask { await self.sendStatistics() }
            group.addTask { try await self.stayRegistered(port: port, onReady: onReady) }
        }
    }

    /// Connects to the coordinator, registers (reporting every shard held, so that a restarted
    /// coordinator can rebuild its state) and heartbeats; reconnects with backoff if it goes away.
    /// When the coordinator answers STALE_EPOCH, it has declared this incarnation dead and failed its
    /// shards over: the worker drops them and rejoins at once as a new incarnation.
    private func stayRegistered(port: Int, onReady: @escaping @Sendable (Int) async -> Void) async throws {
        let announced = Mutex(false)
        var backoff = Duration.milliseconds(100)
        while !Task.isCancelled {
            if let lapsed = leaseLapsed() {
                await rejoinEmpty("no heartbeat acknowledged within the coordinator's lease of \(lapsed)")
            }
            do {
                try await network.withConnection(
                    to: configuration.coordinator,
                    handshake: Handshake(local: identity, acceptedPeerRoles: [.coordinator]),
                    handler: WorkerHandler(worker: self),
                    logger: logger
                ) { connection in
                    var register = Tessera_V1_RegisterWorker()
                    register.endpoint.nodeID = self.configuration.nodeID
                    register.endpoint.host = self.configuration.advertisedHost ?? self.configuration.listen.host
                    register.endpoint.port = UInt32(port)
                    register.incarnation = self.incarnation
                    register.memoryCapacityBytes = self.configuration.memoryCapacityBytes
                    register.heldShards = self.store.withLock { $0.heldShards() }
                    register.closedSequences = self.store.withLock { $0.closedSequences }
                    register.previousCoordinatorIncarnation = self.lastCoordinator.withLock { $0 }
                    if let view = self.lastView.withLock({ $0 }) { register.lastView = view }
                    // Short timeouts: a coordinator that stopped answering (partitioned, restarting) is
                    // reconnected to soon after it is back.
                    let sent = self.uptime()
                    let reply = try await connection.request(.registerWorker(register), timeout: .seconds(5))
                    guard case .registerAck(let ack) = reply else {
                        throw WireError(.badRequest, "the coordinator answered registration with \(reply)")
                    }
                    self.lease.withLock {
                        $0 = ack.leaseMillis == 0 ? nil : (.milliseconds(ack.leaseMillis), sent)
                    }
                    self.lastCoordinator.withLock { $0 = ack.coordinatorIncarnation }
                    if ack.hasView { self.keep(ack.view) }
                    self.coordinatorLink.withLock { $0 = connection }
                    defer { self.coordinatorLink.withLock { $0 = nil } }
                    self.logger.info("registered", metadata: ["peer.id": "\(connection.peer)", "port": "\(port)"])
                    // A restarted coordinator rebuilt the sequences from the registration; these let it
                    // budget the ones still prefilling and tighten the others (a running one ignores them).
                    try await connection.notify(self.store.withLock { $0.layerStatistics() }.map { .layerStats($0) })
                    if announced.withLock({ first in
                        defer { first = true }
                        return !first
                    }) {
                        await onReady(port)
                    }
                    try await self.heartbeat(over: connection)
                }
                backoff = .milliseconds(100)
            } catch is CancellationError {
                return
            } catch let error as WireError where error.code == .staleEpoch {
                // After leaving, being dead is the point: this incarnation stops, it does not rejoin.
                if leaving.withLock({ $0 }) { return }
                await rejoinEmpty("declared dead by the coordinator (\(error.message))")
                continue
            } catch {
                logger.warning("coordinator link down; retrying", metadata: ["error": "\(error)"])
            }
            try await network.clock.sleep(for: backoff)
            backoff = min(backoff * 2, .seconds(2))
        }
    }

    /// Tells the coordinator that this incarnation stops, so that it moves the shards held here to
    /// their other copies now rather than after its failure detector's dead-after time; returns once
    /// it has (or after `limit`, or at once without a coordinator). Requests still arriving are
    /// served meanwhile; writes the new primaries' epochs overtake are refused, and clients retry
    /// them there.
    public func leave(within limit: Duration = .seconds(10)) async {
        leaving.withLock { $0 = true }
        guard let link = coordinatorLink.withLock({ $0 }) else {
            logger.warning("stopping without a coordinator to hand the shards over to")
            return
        }
        var message = Tessera_V1_LeaveCluster()
        message.incarnation = incarnation
        do {
            let reply = try await link.request(.leaveCluster(message), timeout: limit)
            guard case .leaveAck(let ack) = reply else {
                throw WireError(.internal, "the coordinator answered leave_cluster with \(reply)")
            }
            logger.info("left the cluster", metadata: ["sequences.moved": "\(ack.sequencesMoved)"])
        } catch {
            logger.warning(
                "leaving the cluster failed; the coordinator fails the shards over when it notices",
                metadata: ["error": "\(error)"]
            )
        }
    }

    /// The lease's length if it has lapsed: the coordinator may have declared this incarnation dead.
    private func leaseLapsed() -> Duration? {
        lease.withLock { lease in
            guard let lease, uptime() - lease.confirmedAt > lease.length else { return nil }
            return lease.length
        }
    }

    /// Drops every copy and takes the next incarnation, to rejoin holding nothing: the coordinator
    /// declared this incarnation dead and failed its shards over, or may have (the lease lapsed).
    private func rejoinEmpty(_ reason: String) async {
        let dropped = store.withLock { $0.dropAll() }
        let next = currentIncarnation.withLock { value in
            value += 1
            return value
        }
        lease.withLock { $0 = nil }
        logger.warning(
            "dropped every shard to rejoin as a new incarnation",
            metadata: ["reason": "\(reason)", "dropped": "\(dropped)", "incarnation": "\(next)"]
        )
    }

    private func heartbeat(over connection: PeerConnection) async throws {
        var number: UInt64 = 0
        while true {
            try await network.clock.sleep(for: configuration.heartbeatInterval)
            number += 1
            let totals = store.withLock { $0.totals() }
            for (modality, bytes) in totals.byModality.buckets {
                Gauge(
                    label: TesseraMetrics.kvBytes,
                    dimensions: [("node", configuration.nodeID), ("modality", modality)]
                )
                .record(bytes)
            }
            Gauge(label: TesseraMetrics.liveSequences).record(totals.sequences)
            var beat = Tessera_V1_Heartbeat()
            beat.incarnation = incarnation
            beat.sequenceNumber = number
            beat.kvBytes = UInt64(totals.total)
            beat.kvBytesByModality = [Tessera_V1_ModalityBytes](byModality: totals.byModality)
            beat.rssBytes = threads == nil ? 0 : ProcessMemory.residentBytes()
            beat.auditBytes = UInt64(totals.audit)
            beat.liveSequences = UInt32(totals.sequences)
            let sent = uptime()
            let reply = try await connection.request(
                .heartbeat(beat),
                timeout: max(.seconds(2), configuration.heartbeatInterval * 8)
            )
            lease.withLock { $0?.confirmedAt = sent }
            if case .heartbeatAck(let ack) = reply, ack.hasView { keep(ack.view) }
            await releaseRetainedPages()
        }
    }

    /// Keeps the coordinator's membership view if it is the newest seen, to report when registering.
    private func keep(_ view: Tessera_V1_MembershipView) {
        lastView.withLock { kept in
            if view.isNewer(than: kept) { kept = view }
        }
    }

    /// Gives the heap's free pages back to the kernel once resident memory has exceeded the bytes
    /// held (cache, prefills, audit copies) by more than the allowance for a second (`RetainedPages`).
    /// Checked every heartbeat and after a budget or a close frees a sequence's rows, at most once per
    /// `RetainedPages.interval`.
    func releaseRetainedPages() async {
        guard let threads else { return }
        let now = uptime()
        guard retainedPages.withLock({ $0.due(at: now) }) else { return }
        let held = store.withLock { $0.heldBytes() }
        let base = baseResidentBytes.withLock { $0 }
        let resident = ProcessMemory.residentBytes()
        guard retainedPages.withLock({ $0.observe(resident: resident, base: base, held: held, at: now) }),
            trimming.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged
        else { return }
        defer { trimming.store(false, ordering: .releasing) }
        _ = try? await threads.trim.runIfActive { ProcessMemory.releaseFreePages() }
    }

    /// Applies a write on every replica (concurrently); throws UNAVAILABLE naming the first replica
    /// that did not apply it.
    func replicate(_ write: Tessera_V1_Envelope.OneOf_Body, to replicas: [NodeAddress]) async throws {
        guard !replicas.isEmpty else { return }
        guard let pool = peers.withLock({ $0 }) else {
            throw WireError(.unavailable, "this worker is shutting down")
        }
        try await withThrowingDiscardingTaskGroup { group in
            for replica in replicas {
                group.addTask {
                    do {
                        _ = try await pool.connection(to: replica).request(write, timeout: .seconds(300))
                    } catch {
                        throw WireError(
                            .unavailable,
                            "replica \(replica) did not apply the write: \(error)",
                            retryAfter: .milliseconds(200)
                        )
                    }
                }
            }
        }
    }

    /// Streams a shard's copy to `target`: the begin part, its layers, the commit; returns the digest of
    /// the copy the target installed and the bytes of tensor data and row arrays it carried.
    func send(_ copy: OutgoingShard, to target: NodeAddress) async throws -> (digest: UInt64, bytes: UInt64) {
        guard let pool = peers.withLock({ $0 }) else {
            throw WireError(.unavailable, "this worker is shutting down")
        }
        let connection = try await pool.connection(to: target)
        @Sendable func deliver(_ part: Tessera_V1_ShardTransfer) async throws -> UInt64 {
            let reply = try await connection.request(.shardTransfer(part), timeout: .seconds(60))
            guard case .shardTransferAck(let ack) = reply else {
                throw WireError(.internal, "\(target) answered a shard transfer with \(reply)")
            }
            return ack.digest
        }
        _ = try await deliver(copy.begin)
        // Layers in any order, a few at a time: each is cut on the compute threads just before it
        // goes, and the target converts it on its own while the next ones are on the wire.
        let bytes = try await withThrowingTaskGroup(of: UInt64.self) { group in
            var bytes: UInt64 = 0
            for (index, layer) in copy.layers.enumerated() {
                if index >= Self.layersInFlight, let sent = try await group.next() { bytes += sent }
                group.addTask {
                    let part = try await self.offload(.prefill) { try copy.part(layer: layer) }
                    _ = try await deliver(part)
                    return part.payloadBytes
                }
            }
            for try await sent in group { bytes += sent }
            return bytes
        }
        return (try await deliver(copy.commit), bytes)
    }

    /// Layer parts of a shard copy on the wire at once.
    static let layersInFlight = 4

    /// Queues layer statistics for the coordinator; `sendStatistics` sends them in order, a message per
    /// layer and the layers reported together in one write. A prefill is acknowledged without waiting
    /// for them: statistics lost with a coordinator connection are sent again when the worker
    /// registers anew (`WorkerState.layerStatistics`).
    func report(_ statistics: [Tessera_V1_LayerStats]) {
        guard !statistics.isEmpty else { return }
        statisticsOutbox.continuation.yield(statistics)
    }

    private func sendStatistics() async {
        for await statistics in statisticsOutbox.stream {
            guard let link = coordinatorLink.withLock({ $0 }) else { continue }
            do {
                try await link.notify(statistics.map { .layerStats($0) })
            } catch {
                logger.debug("layer statistics not sent; they go again on registering", metadata: ["error": "\(error)"])
            }
        }
    }

    var port: Int? { boundPort.withLock { $0 } }

    /// K/V bytes of every copy this worker holds (primaries and replicas), and of which sequences.
    package func held() async -> (bytes: Int, sequences: [UInt64]) {
        store.withLock { ($0.kvBytes(), $0.sequenceIDs) }
    }

    /// Tensor work by what waits on it: a prefill (seconds, and no step waits for it), a decode step
    /// (milliseconds, and a client waits), an audited decode step (the step and the full cache's
    /// reference beside it, to score it: measurement, not serving).
    enum Work { case prefill, decode, audit }

    /// Runs `work` on the threads for its kind (inline when simulated); prefill work and audited
    /// steps at a lower priority than decode steps (`PrefillPriority`).
    func offload<T: Sendable>(_ kind: Work, _ work: @escaping @Sendable () throws -> T) async throws -> T {
        guard let threads else { return try work() }
        return try await threads.run(kind, work)
    }
}

/// A worker process's threads for tensor work, so that it never occupies the cooperative pool that
/// serves connections and heartbeats: long prefill work (expansion, profiles, compression) on one
/// pool, decode steps (milliseconds each) on another, so that a step never queues behind a prefill,
/// audited steps on a third, so that they queue behind neither, and the prefill and audit threads at
/// a lower priority, so that a step does not share a core evenly with them. An audited step decodes
/// the full cache too (ten times a compressed step's work at 10%): at the steps' priority, the
/// measurement would slow down the steps it measures.
package struct ComputeThreads: Sendable {
    let prefill = NIOThreadPool(numberOfThreads: WorkerService.cores)
    let decode = NIOThreadPool(numberOfThreads: WorkerService.cores)
    let audit = NIOThreadPool(numberOfThreads: WorkerService.cores)
    /// The threads a prefill job or an audited step splits its work with (`team`), in their class too.
    let prefillHelpers = NIOThreadPool(numberOfThreads: max(1, WorkerService.cores - 1))
    /// Runs `malloc_trim`, which can take milliseconds on a large heap: never queued behind a prefill
    /// (the heartbeat loop waits for it) and never on an event loop.
    let trim = NIOThreadPool(numberOfThreads: 1)

    package init() {}

    private var pools: [NIOThreadPool] { [prefill, prefillHelpers, decode, audit, trim] }

    func start() {
        for pool in pools { pool.start() }
    }

    /// Runs `work` on the pool for its kind; prefill work and audited steps first lower their
    /// thread's priority.
    func run<T: Sendable>(_ kind: WorkerService.Work, _ work: @escaping @Sendable () throws -> T) async throws -> T {
        let pool: NIOThreadPool
        switch kind {
        case .decode: return try await decode.runIfActive(work)
        case .prefill: pool = prefill
        case .audit: pool = audit
        }
        return try await pool.runIfActive {
            PrefillPriority.apply()
            return try work()
        }
    }

    /// Every core; the share of a prefill job or an audited step beyond its own thread runs on
    /// `prefillHelpers`, so that all of it stays below decode steps (the system's shared threads run
    /// at the process's priority).
    func team(_ kind: WorkerService.Work) -> ThreadTeam {
        switch kind {
        case .decode:
            return .dispatch(WorkerService.cores)
        case .prefill, .audit:
            return ThreadTeam(count: WorkerService.cores) { [helpers = prefillHelpers] count, body in
                withoutActuallyEscaping(body) { body in
                    // The helpers hold the box, not the closure: a pool releases a work item only
                    // after it ran, which may be after `wait` returns, and the closure must not
                    // outlive this call.
                    let work = HelperWork(body)
                    let done = DispatchGroup()
                    for index in 1..<count {
                        done.enter()
                        // A pool that has shut down runs the item here, at once.
                        helpers.submit { _ in
                            PrefillPriority.apply()
                            work.body?(index)
                            done.leave()
                        }
                    }
                    body(0)
                    done.wait()
                    work.body = nil
                }
            }
        }
    }

    /// A split job's closure as its helpers see it.
    private final class HelperWork: @unchecked Sendable {
        // SAFETY: set before any helper starts and cleared after every helper has signalled.
        var body: (@Sendable (Int) -> Void)?
        init(_ body: @escaping @Sendable (Int) -> Void) { self.body = body }
    }

    func shutdown() {
        for pool in pools { pool.shutdownGracefully { _ in } }
    }
}

public import ClusterSecurity
public import ClusterTransport
public import ClusterWire
public import KVCacheCore
public import Logging
import NIOPosix
import Synchronization
public import Workloads

/// Where one open sequence lives: the placement epoch and each shard's layers and primary.
public struct SequencePlacement: Sendable, Hashable {
    public struct Shard: Sendable, Hashable {
        public var id: UInt32
        public var layers: Range<Int>
        public var primary: NodeAddress
        /// Where the primary forwards the shard's writes.
        public var replicas: [NodeAddress]
    }

    public var sequenceID: UInt64
    public var epoch: UInt64
    public var shards: [Shard]
}

/// One worker's copy of one shard of a sequence.
public struct ShardCopy: Sendable, Hashable {
    public var sequenceID: UInt64
    public var shardID: UInt32
    public var isPrimary: Bool
    public var kvBytes: UInt64
    /// Digest of the copy's cached bytes (0 before compression).
    public var digest: UInt64
}

/// One decode step's outcome over every shard.
public struct DecodeStep: Sendable {
    /// Attention outputs per layer, `queryHeads × headDim`.
    public var outputs: [Int: [Float]] = [:]
    /// K/V bytes the shards hold for the sequence after the step, and what they would hold uncompressed.
    public var kvBytes: UInt64 = 0
    public var fullKVBytes: UInt64 = 0
    /// For an audited sequence: the step's outputs scored against the full cache.
    public var fidelity: FidelityReport?
    /// The compute the shards' primaries spent on the sequence before its first step, summed.
    public var work = PrefillWork()
    /// How the shards' compressed heads keep the prompt, over every shard.
    public var headRowShares: HeadRowShares?

    public init() {}
}

/// What the cluster reports about itself.
public struct ClusterStatus: Sendable, Codable, Hashable {
    public struct Worker: Sendable, Codable, Hashable {
        public var id: String
        public var address: String
        public var state: String
        /// Shards of open sequences it holds as the primary, and as a replica.
        public var primaryShards: Int
        public var replicaShards: Int
        public var kvBytes: UInt64
        public var kvBytesByModality: [String: UInt64]
        public var rssBytes: UInt64
        /// Full-cache copies kept for audited sequences (not in `kvBytes`).
        public var auditBytes: UInt64
        public var liveSequences: Int
    }

    /// An open sequence of the client's tenant.
    public struct Sequence: Sendable, Codable, Hashable {
        public var id: UInt64
        /// `prefilling` until every copy applied its budget, then `decoding`.
        public var state: String
        public var policy: String
        /// The retention it is compressed to (after any tightening), or will be.
        public var retention: Double
        public var promptLength: Int
        /// Accounted bytes of one copy of each shard, the rows decode may add included.
        public var kvBytes: UInt64
        /// Moved by each failover.
        public var epoch: UInt64
        public var shards: Int
        /// Once compressed: the smallest and the largest share of the prompt's rows one KV head keeps.
        public var headRowShares: HeadRowShares?
    }

    public var workers: [Worker]
    /// Open sequences of every tenant.
    public var sequences: Int
    public var totalKVBytes: UInt64
    /// What the memory limit charges, read at one instant (`totalKVBytes` sums the workers' last
    /// heartbeats, which are not).
    public var accountedKVBytes: UInt64
    /// The cluster's memory limit on accounted bytes; 0 when there is none.
    public var memoryLimitBytes: UInt64
    /// Shards with fewer live copies than the replication factor allows (being re-replicated).
    public var underReplicatedShards: Int
    /// The client's tenant's open sequences, when asked for (`status(includeSequences:)`).
    public var openSequences: [Sequence]?
}

/// The client library: opens sequences through the coordinator, then talks to the workers directly,
/// following the placement, which the coordinator pushes when a failover moves it; retries with a
/// fresh placement while a shard fails over (see `onEveryShard`). Connections (the coordinator's
/// too, reopened after a restart) live inside `withClient`'s scope and close when it returns.
public final class TesseraClient: Sendable {
    public let tenant: String
    private let coordinatorAddress: NodeAddress
    private let pool: ConnectionPool
    private let book: PlacementBook
    /// The network's clock, which times retries and backoffs, and the time since the client started.
    private let clock: any Clock<Duration>
    private let elapsed: @Sendable () -> Duration
    /// Per opened sequence, how long its prefill may take (`prefillTimeout`).
    private let prefillTimeouts = Mutex<[UInt64: Duration]>([:])
    private let retries = Atomic<Int>(0)

    /// Writes sent again after a failure a fresh placement or connection could cure (see `onEveryShard`).
    public var retriedRequests: Int { retries.load(ordering: .relaxed) }

    init(tenant: String, coordinator: NodeAddress, pool: ConnectionPool, book: PlacementBook, network: any Network) {
        self.tenant = tenant
        self.coordinatorAddress = coordinator
        self.pool = pool
        self.book = book
        self.clock = network.clock
        self.elapsed = network.elapsedTime()
    }

    /// Connects to the coordinator and runs `body` with a client; every connection closes afterwards.
    /// Over mutual TLS the client is the node and tenant its certificate names (`tenant`, if given,
    /// must be that one); insecure, it claims `nodeID` and `tenant` (default `default`).
    public static func withClient<T: Sendable>(
        coordinator address: NodeAddress,
        security: TransportSecurity,
        tenant: String? = nil,
        nodeID: String = "client",
        logger: Logger,
        maxFrameBytes: Int = 64 << 20,
        _ body: @escaping @Sendable (TesseraClient) async throws -> T
    ) async throws -> T {
        let (nodeID, tenant) = try clientIdentity(security: security, tenant: tenant, nodeID: nodeID)
        return try await withClient(
            coordinator: address,
            network: TCPNetwork(security: security, maxFrameBytes: maxFrameBytes),
            tenant: tenant,
            nodeID: nodeID,
            logger: logger,
            body
        )
    }

    /// `withClient` over any network (the simulator's too), as `nodeID` of `tenant`.
    package static func withClient<T: Sendable>(
        coordinator address: NodeAddress,
        network: any Network,
        tenant: String,
        nodeID: String,
        logger: Logger,
        _ body: @escaping @Sendable (TesseraClient) async throws -> T
    ) async throws -> T {
        let identity = NodeIdentity(role: .client, nodeID: nodeID, incarnation: 1)
        let handshake = Handshake(local: identity, acceptedPeerRoles: [.coordinator, .worker])
        let book = PlacementBook()
        return try await ConnectionPool.withPool(
            network: network,
            handshake: handshake,
            handler: PlacementPushes(book: book),
            logger: logger
        ) { pool in
            _ = try await pool.connection(to: address)
            let client = TesseraClient(tenant: tenant, coordinator: address, pool: pool, book: book, network: network)
            return try await withThrowingTaskGroup(of: T?.self) { group in
                group.addTask {
                    try await client.keepWatching()
                    return nil
                }
                defer { group.cancelAll() }
                return try await body(client)
            }
        }
    }

    /// Keeps the coordinator's placement pushes coming: whenever the connection to it is opened
    /// again (the coordinator restarted, or the link broke), asks for the placement of every open
    /// sequence, which makes this connection their watcher on the coordinator and catches up on a
    /// move whose push was lost. A restarted coordinator knows a sequence only once its workers have
    /// registered again, so each is asked for until it answers; an unwatched sequence is closed by
    /// the coordinator after its orphan grace.
    private func keepWatching() async throws {
        var backoff = Duration.milliseconds(100)
        while true {
            guard let connection = try? await coordinator else {
                try await clock.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(1))
                continue
            }
            backoff = .milliseconds(100)
            // Nothing on the first connection: no sequence is open yet.
            for id in book.sequenceIDs { try await watchAgain(id, over: connection) }
            await connection.waitUntilClosed()
            try Task.checkCancellation()
        }
    }

    /// Asks for the sequence's placement until the coordinator answers (or the connection closes,
    /// or the sequence is gone).
    private func watchAgain(_ sequenceID: UInt64, over connection: PeerConnection) async throws {
        guard !connection.isClosed, book.placement(sequenceID) != nil else { return }
        do {
            // For as long as the connection lasts.
            _ = try await retrying(for: .seconds(Int64.max)) { error in
                (error as? WireError)?.code == .unavailable && !connection.isClosed
                    && book.placement(sequenceID) != nil
            } _: {
                try await refreshPlacement(sequenceID)
            }
        } catch let error as CancellationError {
            throw error
        } catch {
            return  // the sequence is gone, or the next connection watches it
        }
    }

    /// Runs `body` until it succeeds, or fails with an error `retry` does not accept, or the wait
    /// before the next try would end past `patience` from now (then that error is thrown). Waits the
    /// error's retry-after, else 100 ms doubling to 1 s.
    private func retrying<T>(
        for patience: Duration,
        while retry: (any Error) -> Bool,
        _ body: () async throws -> T
    ) async throws -> T {
        var backoff = Duration.milliseconds(100)
        let deadline = elapsed() + patience
        while true {
            do {
                return try await body()
            } catch  where retry(error) {
                let wait = (error as? WireError)?.retryAfter ?? backoff
                guard elapsed() + wait < deadline else { throw error }
                try await clock.sleep(for: wait)
                backoff = min(backoff * 2, .seconds(1))
            }
        }
    }

    private static func clientIdentity(
        security: TransportSecurity,
        tenant: String?,
        nodeID: String
    ) throws(WireError) -> (nodeID: String, tenant: String) {
        guard let certified = security.identity else { return (nodeID, tenant ?? "default") }
        guard certified.role == .client, let certifiedTenant = certified.tenant else {
            throw WireError(.permissionDenied, "a client needs a client certificate; this one names \(certified)")
        }
        if let tenant, tenant != certifiedTenant {
            throw WireError(
                .permissionDenied,
                "asked to act for tenant \(tenant), but the client certificate \(certified.nodeID) is for tenant \(certifiedTenant)"
            )
        }
        return (certified.nodeID, certifiedTenant)
    }

    /// The connection to the coordinator, opened again if it closed (the coordinator restarted).
    private var coordinator: PeerConnection {
        get async throws { try await pool.connection(to: coordinatorAddress) }
    }

    /// Opens a sequence; the coordinator admits it (or refuses with RESOURCE_EXHAUSTED) and places it.
    /// `decodeTokens` is how many steps the client expects to decode (admission reserves their rows).
    /// An id below 2^62 is the client's own, scoped to its tenant (another tenant's sequence with the
    /// same id is another sequence); with 0 this client draws one at random. Either way the
    /// placement's `sequenceID` is the cluster's id for it (`clusterID(_:)`); this client's methods
    /// take both. An answer lost with its connection, or an UNAVAILABLE (a coordinator rebuilding
    /// after a restart), is retried under the same id for up to `failoverPatience`: the coordinator
    /// answers a repeated open with the first one's placement, so it never opens a second sequence.
    public func openSequence(
        _ sequenceID: UInt64,
        geometry: ModelGeometry,
        layout: PromptLayout,
        policy: CompressionPolicy,
        retention: Double,
        decodeTokens: Int = 0
    ) async throws -> SequencePlacement {
        var message = Tessera_V1_OpenSequence()
        message.tenant = tenant
        message.sequenceID = sequenceID == 0 ? UInt64.random(in: 1..<SequenceIDs.clientLimit) : sequenceID
        message.decodeTokens = UInt32(clamping: decodeTokens)
        message.model = try geometry.proto()
        message.spans = try layout.proto()
        message.policy = try policy.proto(retention: retention)
        let reply = try await retrying(for: Self.failoverPatience) { error in
            guard let error = error as? WireError else { return false }
            return [.unavailable, .malformedFrame].contains(error.code)
        } _: {
            try await coordinator.request(.openSequence(message))
        }
        let placement = try remember(reply)
        prefillTimeouts.withLock {
            $0[placement.sequenceID] = Self.prefillTimeout(geometry: geometry, promptLength: layout.promptLength)
        }
        return placement
    }

    /// How long a prefill may take before the client gives up on a worker: 30 s, plus the work at
    /// rates far below what the kernels reach here (K/V expanded at 20 MB/s, an attention profile of
    /// every prompt row at 5 GFLOP/s, against ~160 GFLOP/s measured on 2 cores), so a worker busy with
    /// other prefills is waited for and a stuck one is still found. The `tiny` model gets 30 s; a
    /// 3,000-token multi-image prompt on LLaVA-1.6-Mistral-7B about five minutes.
    public static func prefillTimeout(geometry g: ModelGeometry, promptLength m: Int) -> Duration {
        let bytes = Double(2 * g.layers * g.kvHeads * m * g.headDim * MemoryLayout<Float>.size)
        let flops = AttentionProfile.flops(geometry: g, promptLength: m, firstRow: 0) * Double(g.layers)
        return .seconds(30 + bytes / 20e6 + flops / 5e9)
    }

    /// The cluster's id for one of this client's ids (`SequenceIDs`): what placements, workers and
    /// their replies carry. The cluster's ids map to themselves.
    public func clusterID(_ sequenceID: UInt64) -> UInt64 { SequenceIDs.cluster(sequenceID, tenant: tenant) }

    /// Asks the coordinator for the sequence's current placement.
    public func refreshPlacement(_ sequenceID: UInt64) async throws -> SequencePlacement {
        var message = Tessera_V1_PlacementRequest()
        message.tenant = tenant
        message.sequenceID = clusterID(sequenceID)
        return try remember(try await coordinator.request(.placementRequest(message)))
    }

    /// Prefills every shard from a workload seed that each worker expands deterministically (with
    /// `settings`' prompt shape when given). `audit` has the workers keep the full cache beside the
    /// compressed one and score every decode step against it.
    public func prefillSynthetic(
        _ sequenceID: UInt64,
        workload: String,
        seed: UInt64,
        index: Int,
        settings: TraceSettings? = nil,
        audit: Bool = false
    ) async throws -> UInt64 {
        var source = Tessera_V1_SyntheticSource()
        source.workload = workload
        source.seed = seed
        source.sequenceIndex = UInt32(index)
        if let settings { source.shape = settings.shape }
        let synthetic = source
        return try await prefillEveryShard(sequenceID, audit: audit) { prefill, _, _ in prefill.synthetic = synthetic }
    }

    /// Prefills every shard with `trace`'s tensors, sent inline as `scalarType` in parts of whole
    /// layers of at most `partBytes` each (a layer larger than that goes alone, and must fit the frame
    /// limit). Two parts of a shard are on their way at once, and the next is converted meanwhile.
    public func prefill(
        _ sequenceID: UInt64,
        trace: some PromptTrace,
        as scalarType: ScalarType = .float32,
        audit: Bool = false,
        partBytes: Int = 16 << 20
    ) async throws -> UInt64 {
        let g = trace.geometry
        let m = trace.layout.promptLength
        // At most: keys, values and a query for every prompt row.
        let layerBytes = (2 * g.kvHeads + g.queryHeads) * m * g.headDim * scalarType.byteWidth
        let layersPerPart = max(1, partBytes / max(1, layerBytes))
        let parts = PrefetchedParts(layersPerPart: layersPerPart) { layers in
            try layers.map { layer in
                try trace.prefill(layer: layer).proto(layer: layer, scalarType: scalarType, queryScalarType: scalarType)
            }
        }
        return try await prefillEveryShard(sequenceID, audit: audit, layersPerPart: layersPerPart) {
            prefill,
            layers,
            shard in
            var inline = Tessera_V1_InlineTensors()
            inline.layers = try await parts.tensors(layers, of: shard)
            prefill.inlineTensors = inline
        }
    }

    /// Sends every shard a prefill whose tensors `source` sets (given the part's layers and the
    /// shard's), for the shard's layers in parts of `layersPerPart`; returns the K/V bytes the shards
    /// stored.
    private func prefillEveryShard(
        _ sequenceID: UInt64,
        audit: Bool,
        layersPerPart: Int = .max,
        source: @escaping @Sendable (inout Tessera_V1_Prefill, Range<Int>, Range<Int>) async throws -> Void
    ) async throws -> UInt64 {
        let sequenceID = clusterID(sequenceID)
        let timeout = prefillTimeouts.withLock { $0[sequenceID] } ?? .seconds(300)
        let acks = try await onEveryShard(sequenceID, timeout: timeout, layersPerPart: layersPerPart) {
            shard,
            placement,
            layers in
            var prefill = Tessera_V1_Prefill()
            prefill.tenant = self.tenant
            prefill.sequenceID = sequenceID
            prefill.shardID = shard.id
            prefill.epoch = placement.epoch
            prefill.audit = audit
            try await source(&prefill, layers, shard.layers)
            return .prefill(prefill)
        }
        // Each part's ack gives what its shard held then; parts are acknowledged in any order, and
        // the shard only grows, so its most is what it holds.
        var held: [UInt32: UInt64] = [:]
        for case .prefillAck(let ack) in acks { held[ack.shardID] = max(held[ack.shardID] ?? 0, ack.kvBytes) }
        return held.values.reduce(0) { $0.saturatingSum($1) }
    }

    /// Runs one decode step on every shard. With `inputs` nil the workers expand the step from the
    /// prefill's workload seed. Returns each layer's attention outputs (`queryHeads × headDim`).
    public func decode(
        _ sequenceID: UInt64,
        step: Int,
        geometry: ModelGeometry,
        inputs: [Int: DecodeStepInput]? = nil
    ) async throws -> [Int: [Float]] {
        try await decodeStep(sequenceID, step: step, geometry: geometry, inputs: inputs).outputs
    }

    /// `decode`, with what the shards hold afterwards and, for an audited sequence, the step's fidelity.
    public func decodeStep(
        _ sequenceID: UInt64,
        step: Int,
        geometry: ModelGeometry,
        inputs: [Int: DecodeStepInput]? = nil
    ) async throws -> DecodeStep {
        let sequenceID = clusterID(sequenceID)
        let replies = try await onEveryShard(sequenceID) { shard, placement, _ in
            var decode = Tessera_V1_Decode()
            decode.tenant = self.tenant
            decode.sequenceID = sequenceID
            decode.shardID = shard.id
            decode.epoch = placement.epoch
            decode.step = UInt32(step)
            if let inputs {
                decode.layers = try shard.layers.map { layer in
                    guard let input = inputs[layer] else {
                        throw WireError(.badRequest, "no decode input for layer \(layer)")
                    }
                    return try input.proto(layer: layer, geometry: geometry)
                }
            }
            return .decode(decode)
        }
        var step = DecodeStep()
        for reply in replies {
            guard case .decodeResult(let result) = reply else { continue }
            for output in result.outputs {
                step.outputs[Int(output.layer)] = try output.outputValues(geometry: geometry)
            }
            step.kvBytes = step.kvBytes.saturatingSum(result.kvBytes)
            step.fullKVBytes = step.fullKVBytes.saturatingSum(result.fullKvBytes)
            step.work.add(PrefillWork(result))
            step.headRowShares = step.headRowShares.merged(
                with: HeadRowShares(proto: result.headRowShares, present: result.hasHeadRowShares)
            )
            if result.hasAudit {
                var fidelity = step.fidelity ?? FidelityReport()
                fidelity.relativeErrorSum += result.audit.relativeErrorSum
                fidelity.outputs += Int(result.audit.outputs)
                fidelity.needleProbes += Int(result.audit.needleProbes)
                fidelity.needleCorrect += Int(result.audit.needleCorrect)
                step.fidelity = fidelity
            }
        }
        return step
    }

    /// Closes the sequence everywhere; returns the bytes the workers freed.
    public func close(_ sequenceID: UInt64) async throws -> UInt64 {
        let sequenceID = clusterID(sequenceID)
        var message = Tessera_V1_Close()
        message.tenant = tenant
        message.sequenceID = sequenceID
        let reply = try await coordinator.request(.close(message))
        book.forget(sequenceID)
        _ = prefillTimeouts.withLock { $0.removeValue(forKey: sequenceID) }
        if case .closeAck(let ack) = reply { return ack.freedBytes }
        return 0
    }

    /// The shard copies one worker holds, with their digests: replicas of a shard hold equal bytes.
    /// Asked again for up to 2 s while the error is one a new connection may cure (a request damaged
    /// in transit makes the worker close the connection); reading status changes nothing.
    public func shardCopies(on worker: NodeAddress) async throws -> [ShardCopy] {
        var request = Tessera_V1_StatusRequest()
        request.includeSequences = true
        let body = try await retrying(for: .seconds(2), while: Self.isRetryable) {
            try await pool.connection(to: worker).request(.statusRequest(request))
        }
        guard case .statusReply(let reply) = body else {
            throw WireError(.badRequest, "the worker answered status with something else")
        }
        return reply.sequences.map { sequence in
            ShardCopy(
                sequenceID: sequence.sequenceID,
                shardID: sequence.shardID,
                isPrimary: sequence.primary,
                kvBytes: sequence.kvBytes,
                digest: sequence.digest
            )
        }
    }

    /// The cluster's members and figures; with `includeSequences`, also this tenant's open sequences.
    public func status(includeSequences: Bool = false) async throws -> ClusterStatus {
        var request = Tessera_V1_StatusRequest()
        request.includeSequences = includeSequences
        guard case .statusReply(let reply) = try await coordinator.request(.statusRequest(request)) else {
            throw WireError(.badRequest, "the coordinator answered status with something else")
        }
        var status = ClusterStatus(reply)
        if includeSequences {
            status.openSequences = reply.sequences.map { sequence in
                ClusterStatus.Sequence(
                    id: sequence.sequenceID,
                    state: sequence.state == .decoding ? "decoding" : "prefilling",
                    policy: sequence.policy,
                    retention: sequence.retention,
                    promptLength: Int(sequence.promptLength),
                    kvBytes: sequence.kvBytes,
                    epoch: sequence.epoch,
                    shards: Int(sequence.shardCount),
                    headRowShares: HeadRowShares(proto: sequence.headRowShares, present: sequence.hasHeadRowShares)
                )
            }
        }
        return status
    }

    /// Sends each shard's requests to its primary, the shards concurrently: one per `layersPerPart`
    /// of the shard's layers (`make` builds the request for those layers), up to `partsInFlight` of
    /// a shard at once; returns every reply. When the primary cannot take a request
    /// (NOT_PRIMARY, STALE_EPOCH, UNAVAILABLE, or the connection failed: a failover may be under way)
    /// it refreshes the placement and retries that request with backoff, for up to `failoverPatience`.
    /// Writes are idempotent (a prefill, a part of one or a decode step already applied is answered,
    /// not reapplied).
    private func onEveryShard(
        _ sequenceID: UInt64,
        timeout: Duration = .seconds(60),
        layersPerPart: Int = .max,
        _ make:
            @escaping @Sendable (SequencePlacement.Shard, SequencePlacement, Range<Int>) async throws ->
            Tessera_V1_Envelope.OneOf_Body
    ) async throws -> [Tessera_V1_Envelope.OneOf_Body] {
        guard let placement = book.placement(sequenceID) else {
            throw WireError(.unknownSequence, "sequence \(sequenceID) was not opened by this client")
        }
        return try await withThrowingTaskGroup(of: [Tessera_V1_Envelope.OneOf_Body].self) { group in
            for shard in placement.shards {
                group.addTask {
                    let parts = Self.parts(of: shard.layers, layersPerPart: layersPerPart)
                    if parts.count == 1 {
                        return [try await self.send(sequenceID, shard, placement, parts[0], timeout: timeout, make)]
                    }
                    return try await withThrowingTaskGroup(of: Tessera_V1_Envelope.OneOf_Body.self) { sending in
                        var replies: [Tessera_V1_Envelope.OneOf_Body] = []
                        for (index, layers) in parts.enumerated() {
                            if index >= Self.partsInFlight, let reply = try await sending.next() {
                                replies.append(reply)
                            }
                            // A part starts from the newest placement known (an earlier part may have
                            // followed a failover).
                            let latest = self.book.placement(sequenceID) ?? placement
                            let moved = latest.shards.first { $0.id == shard.id } ?? shard
                            sending.addTask {
                                try await self.send(sequenceID, moved, latest, layers, timeout: timeout, make)
                            }
                        }
                        for try await reply in sending { replies.append(reply) }
                        return replies
                    }
                }
            }
            var replies: [Tessera_V1_Envelope.OneOf_Body] = []
            for try await shardReplies in group { replies += shardReplies }
            return replies
        }
    }

    /// How many parts of one shard's prefill are on their way at once: the worker takes the next part
    /// off the wire while it still checks and profiles this one.
    static let partsInFlight = 2

    /// `layers` in runs of `layersPerPart`: at least one run, an empty one for a shard without layers.
    static func parts(of layers: Range<Int>, layersPerPart: Int) -> [Range<Int>] {
        guard !layers.isEmpty else { return [layers] }
        let step = max(1, min(layersPerPart, layers.count))
        return stride(from: layers.lowerBound, to: layers.upperBound, by: step).map {
            $0..<min($0 + step, layers.upperBound)
        }
    }

    /// Sends one request (a part's, for `layers`) to the shard's primary, retried under its
    /// coordinator's placement until the failover patience runs out.
    private func send(
        _ sequenceID: UInt64,
        _ shard: SequencePlacement.Shard,
        _ placement: SequencePlacement,
        _ layers: Range<Int>,
        timeout: Duration,
        _ make:
            @escaping @Sendable (SequencePlacement.Shard, SequencePlacement, Range<Int>) async throws ->
            Tessera_V1_Envelope.OneOf_Body
    ) async throws -> Tessera_V1_Envelope.OneOf_Body {
        var current = (shard: shard, placement: placement)
        var backoff = Duration.milliseconds(50)
        let deadline = elapsed() + Self.failoverPatience
        while true {
            do {
                return try await attempt(sequenceID, current.shard, current.placement, timeout: timeout) {
                    shard,
                    placement in try await make(shard, placement, layers)
                }
            } catch {
                guard Self.isRetryable(error), elapsed() + backoff < deadline else { throw error }
                retries.add(1, ordering: .relaxed)
                try await clock.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(1))
                // While the coordinator is away (restarting) the old placement is retried.
                guard let fresh = try? await refreshPlacement(sequenceID) else { continue }
                guard let moved = fresh.shards.first(where: { $0.id == shard.id }) else { throw error }
                current = (moved, fresh)
            }
        }
    }

    /// One request to the shard's primary. A primary that froze (a gray failure) never answers: once
    /// the coordinator pushes a placement at a newer epoch, the request is abandoned for a retry there.
    private func attempt(
        _ sequenceID: UInt64,
        _ shard: SequencePlacement.Shard,
        _ placement: SequencePlacement,
        timeout: Duration,
        _ make:
            @escaping @Sendable (SequencePlacement.Shard, SequencePlacement) async throws ->
            Tessera_V1_Envelope.OneOf_Body
    ) async throws -> Tessera_V1_Envelope.OneOf_Body {
        try await withThrowingTaskGroup(of: Tessera_V1_Envelope.OneOf_Body?.self) { group in
            group.addTask {
                let request = try await make(shard, placement)
                return try await self.pool.connection(to: shard.primary).request(request, timeout: timeout)
            }
            group.addTask {
                await self.book.waitForMove(of: sequenceID, from: placement.epoch)
                try Task.checkCancellation()
                return nil
            }
            defer { group.cancelAll() }
            guard let reply = try await group.next()! else {
                throw WireError(
                    .staleEpoch,
                    "shard \(shard.id) of sequence \(sequenceID) moved while the request was in flight"
                )
            }
            return reply
        }
    }

    /// How long a write keeps retrying while its shard fails over (the coordinator needs the failure
    /// detector's dead-after time to notice).
    static let failoverPatience = Duration.seconds(20)

    /// Errors that a fresh placement or a new connection may cure (a frame damaged in transit was
    /// never applied); any other error is the request's own fault.
    static func isRetryable(_ error: any Error) -> Bool {
        guard let error = error as? WireError else { return !(error is CancellationError) }
        return [.notPrimary, .staleEpoch, .unavailable, .malformedFrame].contains(error.code)
    }

    private func remember(_ reply: Tessera_V1_Envelope.OneOf_Body) throws -> SequencePlacement {
        guard case .placement(let message) = reply else {
            throw WireError(.badRequest, "expected a placement, got \(reply)")
        }
        return book.remember(SequencePlacement(message))
    }
}

extension ClusterStatus {
    init(_ reply: Tessera_V1_StatusReply) {
        workers = reply.workers.map { worker in
            let state =
                switch worker.state {
                case .up, .joining: "alive"
                case .suspect: "suspect"
                default: "dead"
                }
            return Worker(
                id: worker.endpoint.nodeID,
                address: "\(worker.endpoint.host):\(worker.endpoint.port)",
                state: state,
                primaryShards: Int(worker.primaryShards),
                replicaShards: Int(worker.replicaShards),
                kvBytes: worker.kvBytes,
                kvBytesByModality: worker.kvBytesByModality.byModality,
                rssBytes: worker.rssBytes,
                auditBytes: worker.auditBytes,
                liveSequences: Int(worker.liveSequences)
            )
        }
        sequences = Int(reply.sequenceCount)
        totalKVBytes = reply.totalKvBytes
        accountedKVBytes = reply.accountedKvBytes
        memoryLimitBytes = reply.memoryCapacityBytes
        underReplicatedShards = Int(reply.underReplicatedShards)
    }
}

/// A prefill's parts as wire tensors, each converted on NIO's shared thread pool (blocking work of
/// tens of milliseconds a part, kept off the concurrency pool the client's sequences run on): asking
/// for a shard's part starts the conversion of its next one, so it is ready when this one is
/// acknowledged. Holds at most the parts asked for and the next of each shard (a retry asks for the
/// same part again).
private final class PrefetchedParts: Sendable {
    private let layersPerPart: Int
    private let convert: @Sendable (Range<Int>) throws -> [Tessera_V1_LayerTensors]
    private let tasks = Mutex<[Int: Task<[Tessera_V1_LayerTensors], any Error>]>([:])

    init(layersPerPart: Int, convert: @escaping @Sendable (Range<Int>) throws -> [Tessera_V1_LayerTensors]) {
        self.layersPerPart = layersPerPart
        self.convert = convert
    }

    /// The tensors of `layers`, a part of the shard that holds `shard`.
    func tensors(_ layers: Range<Int>, of shard: Range<Int>) async throws -> [Tessera_V1_LayerTensors] {
        let next = layers.upperBound..<min(layers.upperBound + layersPerPart, shard.upperBound)
        let current = tasks.withLock { tasks in
            for first in shard.lowerBound..<layers.lowerBound { tasks[first] = nil }
            let task = tasks[layers.lowerBound] ?? start(layers)
            tasks[layers.lowerBound] = task
            if !next.isEmpty, tasks[next.lowerBound] == nil { tasks[next.lowerBound] = start(next) }
            return task
        }
        return try await current.value
    }

    private func start(_ layers: Range<Int>) -> Task<[Tessera_V1_LayerTensors], any Error> {
        let convert = convert
        return Task { try await NIOThreadPool.singleton.runIfActive { try convert(layers) } }
    }
}

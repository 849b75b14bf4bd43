package import ClusterTransport
package import ClusterWire
package import Logging
import Synchronization
import Workloads

/// Connections between the simulation's nodes, in memory, on the scheduler's clock. A connection
/// behaves as TCP does: frames arrive in order, each after a random latency; a partition or a crash
/// resets every connection it cuts (both ends see the stream fail) and refuses new ones until it
/// heals. A stall (a congested link, or a node paused as by a long garbage collection or SIGSTOP)
/// keeps the connections up and holds every frame across them until it ends, then delivers them in
/// order. A duplicating link (a retransmitting proxy, or a sender that replays what it already
/// wrote) delivers each frame across it twice, the copy right after the original, so every handler
/// must treat a request it already answered, and a reply to no outstanding request, as harmless.
/// What reaches a node is what the real transport would hand it after the handshake, which
/// runs here too, in plaintext: a node `certify` named proves its identity as its certificate would
/// over mutual TLS (the peer's role, node id and tenant come from it); any other is taken at its word.
package final class SimulatedNetwork: Sendable {
    package struct Settings: Sendable {
        /// One-way latency of a frame, drawn uniformly.
        package var latency: ClosedRange<Duration> = .microseconds(50)...(.milliseconds(2))

        package init() {}
    }

    let scheduler: Scheduler
    let settings: Settings
    private let state: Mutex<State>

    private struct Listener {
        var node: String
        var incoming: AsyncStream<Accepted>.Continuation
    }

    private struct State {
        var random: SplitMix64
        var listeners: [NodeAddress: Listener] = [:]
        /// Open connections by the order they were made (walked in that order, so resets are
        /// deterministic).
        var links: [UInt64: SimulatedLink] = [:]
        var nextLink: UInt64 = 0
        /// Unordered pairs of node names that cannot reach each other.
        var partitions: Set<[String]> = []
        /// Until when frames between an unordered pair of nodes are held.
        var stalledLinks: [[String]: Duration] = [:]
        /// Until when frames to and from a node are held.
        var pausedNodes: [String: Duration] = [:]
        /// Until when frames between an unordered pair of nodes are delivered twice.
        var duplicatingLinks: [[String]: Duration] = [:]
        var nextPort = 20_000
        var frames = 0
        /// What each node's certificate would name.
        var certificates: [String: CertifiedIdentity] = [:]
        /// The last requests sent on the network (a ring), for an intruder to replay.
        var recentRequests: [Tessera_V1_Envelope] = []
        var requestsSeen = 0

        func cut(_ a: String, _ b: String) -> Bool { partitions.contains([a, b].sorted()) }

        /// The earliest a frame between `a` and `b` may arrive because of stalls and pauses.
        func heldUntil(_ a: String, _ b: String) -> Duration {
            max(stalledLinks[[a, b].sorted()] ?? .zero, pausedNodes[a] ?? .zero, pausedNodes[b] ?? .zero)
        }

        var linksInOrder: [SimulatedLink] { links.sorted { $0.key < $1.key }.map(\.value) }
    }

    /// Sees every reply as it arrives, with the request it answers and who asked and answered. Only
    /// requests that change a shard are followed (prefill, decode, shard assignment).
    let onReply:
        @Sendable (_ request: Tessera_V1_Envelope, _ reply: Tessera_V1_Envelope, _ from: String, _ to: String) -> Void

    package init(
        scheduler: Scheduler,
        seed: UInt64,
        settings: Settings = .init(),
        onReply: @escaping @Sendable (Tessera_V1_Envelope, Tessera_V1_Envelope, String, String) -> Void = {
            _,
            _,
            _,
            _ in
        }
    ) {
        self.scheduler = scheduler
        self.settings = settings
        self.onReply = onReply
        state = Mutex(State(random: SplitMix64(state: seed)))
    }

    /// The network as `node` sees it (its listeners and connections are its own).
    package func node(_ name: String) -> SimulatedNode { SimulatedNode(network: self, name: name) }

    /// Frames sent so far.
    package var frames: Int { state.withLock { $0.frames } }

    /// How many recent requests `recentRequest(_:)` picks from.
    static let recentRequestsKept = 512

    /// From now on `node` proves `identity` in every handshake, as its certificate would.
    package func certify(_ node: String, as identity: CertifiedIdentity) {
        state.withLock { $0.certificates[node] = identity }
    }

    fileprivate func certificate(of node: String) -> CertifiedIdentity? { state.withLock { $0.certificates[node] } }

    /// One of the last requests any node sent (chosen by `pick`); nil before the first.
    package func recentRequest(_ pick: UInt64) -> Tessera_V1_Envelope? {
        state.withLock { state in
            state.recentRequests.isEmpty ? nil : state.recentRequests[Int(pick % UInt64(state.recentRequests.count))]
        }
    }

    /// The requests sent after the first `seen` (no more than the ring keeps), oldest first, and the
    /// count to pass next time.
    package func requests(after seen: Int) -> (requests: [Tessera_V1_Envelope], seen: Int) {
        state.withLock { state in
            let kept = state.recentRequests.count
            let first = max(seen, state.requestsSeen - kept)
            let requests = (first..<state.requestsSeen).map { state.recentRequests[$0 % Self.recentRequestsKept] }
            return (requests, state.requestsSeen)
        }
    }

    fileprivate func record(_ envelope: Tessera_V1_Envelope) {
        guard let body = envelope.body, body.kind != .reply else { return }
        if case .hello = body { return }
        state.withLock { state in
            if state.recentRequests.count < Self.recentRequestsKept {
                state.recentRequests.append(envelope)
            } else {
                state.recentRequests[state.requestsSeen % Self.recentRequestsKept] = envelope
            }
            state.requestsSeen += 1
        }
    }

    /// Where `node` listens now (its first listener), if it does.
    package func address(of node: String) -> NodeAddress? {
        state.withLock { state in
            state.listeners.filter { $0.value.node == node }.keys.min { $0.port < $1.port }
        }
    }

    /// Cuts `a` off from `b` both ways, resetting their connections, until `heal`.
    package func partition(_ a: String, _ b: String) {
        let cut = state.withLock { state in
            state.partitions.insert([a, b].sorted())
            return state.linksInOrder.filter { Set([$0.dialer, $0.listener]) == Set([a, b]) }
        }
        for link in cut { reset(link, "partitioned") }
    }

    /// Ends every partition, stall, pause and duplication (frames already held still arrive when they
    /// were due).
    package func heal() {
        state.withLock { state in
            state.partitions.removeAll()
            state.stalledLinks.removeAll()
            state.pausedNodes.removeAll()
            state.duplicatingLinks.removeAll()
        }
    }

    /// Holds the frames between `a` and `b`, both ways, until `end` (connections stay up).
    package func stall(_ a: String, _ b: String, until end: Duration) {
        state.withLock { state in
            let pair = [a, b].sorted()
            state.stalledLinks[pair] = max(state.stalledLinks[pair] ?? .zero, end)
        }
    }

    /// Delivers every frame between `a` and `b`, both ways, twice until `end`.
    package func duplicate(_ a: String, _ b: String, until end: Duration) {
        state.withLock { state in
            let pair = [a, b].sorted()
            state.duplicatingLinks[pair] = max(state.duplicatingLinks[pair] ?? .zero, end)
        }
    }

    /// Pauses `node` until `end`, as a stopped process: every frame to and from it is held, as its
    /// peers see it, and its own timers (sleeps on its clock, its requests' timeouts) fire only once
    /// the pause ends.
    package func pause(_ node: String, until end: Duration) {
        state.withLock { $0.pausedNodes[node] = max($0.pausedNodes[node] ?? .zero, end) }
    }

    /// Until when `node` is paused, read when one of its timers is due (zero when it is not).
    func pausedUntil(_ node: String) -> @Sendable () -> Duration {
        { [self] in state.withLock { $0.pausedNodes[node] ?? .zero } }
    }

    package func heal(_ a: String, _ b: String) { _ = state.withLock { $0.partitions.remove([a, b].sorted()) } }

    /// What a process's death does to the network: its connections reset, its ports stop listening.
    package func crash(_ node: String) {
        let (links, listeners) = state.withLock { state in
            let links = state.linksInOrder.filter { $0.dialer == node || $0.listener == node }
            let addresses = state.listeners.filter { $0.value.node == node }.sorted { $0.key.port < $1.key.port }
            for (address, _) in addresses { state.listeners[address] = nil }
            return (links, addresses.map(\.value.incoming))
        }
        for link in links { reset(link, "\(node) crashed") }
        for listener in listeners { listener.finish() }
    }

    private func reset(_ link: SimulatedLink, _ why: String) {
        _ = state.withLock { $0.links.removeValue(forKey: link.id) }
        link.reset(WireError(.unavailable, "connection reset (\(why))"))
    }

    fileprivate func bind(
        _ address: NodeAddress,
        node: String
    ) throws(WireError) -> (
        NodeAddress, AsyncStream<Accepted>
    ) {
        let (stream, continuation) = AsyncStream.makeStream(of: Accepted.self)
        let bound = try state.withLock { state throws(WireError) in
            var bound = address
            if bound.port == 0 {
                bound.port = state.nextPort
                state.nextPort += 1
            }
            guard state.listeners[bound] == nil else { throw WireError(.unavailable, "\(bound) is in use") }
            state.listeners[bound] = Listener(node: node, incoming: continuation)
            return bound
        }
        return (bound, stream)
    }

    fileprivate func unbind(_ address: NodeAddress, node: String) {
        state.withLock { state in
            if state.listeners[address]?.node == node { state.listeners[address] = nil }
        }
    }

    fileprivate func connect(from node: String, to address: NodeAddress) throws(WireError) -> SimulatedLink {
        let (link, listener) = try state.withLock { state throws(WireError) in
            guard let listener = state.listeners[address], !state.cut(node, listener.node) else {
                throw WireError(.unavailable, "cannot connect to \(address): connection refused")
            }
            let link = SimulatedLink(id: state.nextLink, network: self, dialer: node, listener: listener.node)
            state.nextLink += 1
            state.links[link.id] = link
            return (link, listener)
        }
        listener.incoming.yield(Accepted(link: link))
        return link
    }

    fileprivate func forget(_ link: SimulatedLink) {
        _ = state.withLock { $0.links.removeValue(forKey: link.id) }
    }

    /// When a frame sent now from `sender` to `receiver` arrives: after the previous frame that way,
    /// a latency drawn from the seeded stream, and any stall or pause between them; and whether it
    /// arrives twice.
    fileprivate func arrival(
        after previous: Duration,
        from sender: String,
        to receiver: String
    ) -> (at: Duration, twice: Bool) {
        let span = settings.latency.upperBound - settings.latency.lowerBound
        let (draw, held, duplicatedUntil) = state.withLock { state in
            state.frames += 1
            return (
                state.random.next(), state.heldUntil(sender, receiver),
                state.duplicatingLinks[[sender, receiver].sorted()] ?? .zero
            )
        }
        let latency = settings.latency.lowerBound + span * (Double(draw >> 11) / Double(1 << 53))
        return (max(previous, scheduler.now + latency, held), scheduler.now < duplicatedUntil)
    }
}

/// A connection being accepted: the listener's end of a new link.
private struct Accepted: Sendable {
    var link: SimulatedLink
}

/// One connection: a stream of frames each way.
final class SimulatedLink: Sendable {
    enum End: Sendable { case dialer, listener }

    let id: UInt64
    let dialer: String
    let listener: String
    let network: SimulatedNetwork
    private let toListener = AsyncThrowingStream.makeStream(of: Tessera_V1_Envelope.self)
    private let toDialer = AsyncThrowingStream.makeStream(of: Tessera_V1_Envelope.self)
    /// When the last frame sent each way arrives (frames keep their order); nil once reset.
    private let lastArrival = Mutex<(toListener: Duration, toDialer: Duration)?>((.zero, .zero))
    /// Followed requests that arrived and await their reply, by request id (ids of the two ends differ
    /// in parity, so one table serves both).
    private let followed = Mutex<[UInt64: Tessera_V1_Envelope]>([:])

    fileprivate init(id: UInt64, network: SimulatedNetwork, dialer: String, listener: String) {
        self.id = id
        self.network = network
        self.dialer = dialer
        self.listener = listener
    }

    func inbound(at end: End) -> AsyncThrowingStream<Tessera_V1_Envelope, any Error> {
        end == .dialer ? toDialer.stream : toListener.stream
    }

    func outbound(from end: End) -> SimulatedOutbound { SimulatedOutbound(link: self, end: end) }

    /// Delivers `envelope` to the other end after the network's latency, or at `close` ends its stream.
    fileprivate func send(_ envelope: Tessera_V1_Envelope?, from end: End) throws(WireError) {
        let arrival = try lastArrival.withLock { last throws(WireError) -> (at: Duration, twice: Bool) in
            guard var times = last else { throw WireError(.unavailable, "connection reset") }
            let previous = end == .dialer ? times.toListener : times.toDialer
            let arrival =
                end == .dialer
                ? network.arrival(after: previous, from: dialer, to: listener)
                : network.arrival(after: previous, from: listener, to: dialer)
            if end == .dialer { times.toListener = arrival.at } else { times.toDialer = arrival.at }
            last = times
            return arrival
        }
        let continuation = end == .dialer ? toListener.continuation : toDialer.continuation
        if let envelope { network.record(envelope) }
        for _ in 0..<(arrival.twice && envelope != nil ? 2 : 1) {
            network.scheduler.schedule(at: arrival.at) {
                guard let envelope else { return continuation.finish() }
                self.follow(envelope, from: end)
                continuation.yield(envelope)
            }
        }
        if envelope == nil { network.forget(self) }
    }

    private func follow(_ envelope: Tessera_V1_Envelope, from end: End) {
        switch envelope.body {
        case .prefill, .decode, .shardAssignment:
            followed.withLock { $0[envelope.requestID] = envelope }
        case .prefillAck, .decodeResult, .shardAssignmentAck:
            guard let request = followed.withLock({ $0.removeValue(forKey: envelope.requestID) }) else { return }
            network.onReply(request, envelope, end == .dialer ? dialer : listener, end == .dialer ? listener : dialer)
        case .error:
            _ = followed.withLock { $0.removeValue(forKey: envelope.requestID) }
        default:
            break
        }
    }

    fileprivate func reset(_ error: WireError) {
        lastArrival.withLock { $0 = nil }
        toListener.continuation.finish(throwing: error)
        toDialer.continuation.finish(throwing: error)
    }
}

/// One end's writes into a link, timed on the scheduler.
struct SimulatedOutbound: FrameOutbound {
    let link: SimulatedLink
    let end: SimulatedLink.End

    func write(_ envelope: Tessera_V1_Envelope) async throws { try link.send(envelope, from: end) }

    func finish() { try? link.send(nil, from: end) }

    func schedule(after delay: Duration, _ action: @escaping @Sendable () -> Void) -> any ScheduledAction {
        let scheduler = link.network.scheduler
        let node = end == .dialer ? link.dialer : link.listener
        let pausedUntil = link.network.pausedUntil(node)
        return ScheduledTimer(
            scheduler: scheduler,
            token: scheduler.schedule(after: delay, pausedUntil: pausedUntil, action)
        )
    }
}

private struct ScheduledTimer: ScheduledAction {
    let scheduler: Scheduler
    let token: UInt64

    func cancel() { scheduler.cancel(token) }
}

/// What one node of the simulation listens and connects with.
package struct SimulatedNode: Network {
    let network: SimulatedNetwork
    let name: String

    package var clock: any Clock<Duration> {
        SimulatedClock(scheduler: network.scheduler, pausedUntil: network.pausedUntil(name))
    }

    package func listen(
        on address: NodeAddress,
        handshake: Handshake,
        handler: any EnvelopeHandler,
        logger: Logger,
        onBound: @escaping @Sendable (Int) async -> Void,
        onConnection: @escaping @Sendable (PeerConnection) async -> Void
    ) async throws {
        let (bound, incoming) = try network.bind(address, node: name)
        defer { network.unbind(bound, node: name) }
        await onBound(bound.port)
        await withDiscardingTaskGroup { group in
            for await accepted in incoming {
                group.addTask {
                    await accept(accepted.link, handshake: handshake, handler: handler, logger: logger, onConnection)
                }
            }
            group.cancelAll()
        }
        try Task.checkCancellation()
    }

    /// The accepting side of the handshake, then serving the connection, as `Transport.listen` does.
    private func accept(
        _ link: SimulatedLink,
        handshake: Handshake,
        handler: any EnvelopeHandler,
        logger: Logger,
        _ onConnection: @escaping @Sendable (PeerConnection) async -> Void
    ) async {
        let outbound = link.outbound(from: .listener)
        defer { outbound.finish() }
        var frames = link.inbound(at: .listener).makeAsyncIterator()
        guard let first = try? await frames.next() else { return }
        let outcome: HandshakeOutcome
        do {
            outcome = try handshake.acceptHello(first, certificate: network.certificate(of: link.dialer))
        } catch {
            try? await outbound.write(Tessera_V1_Envelope(requestID: first.requestID, error: error))
            return
        }
        try? await outbound.write(handshake.helloAck(for: outcome, requestID: first.requestID))
        let connection = PeerConnection(
            peer: outcome.peer,
            remoteAddress: link.dialer,
            outbound: outbound,
            connected: false,
            maxRequestsInFlight: outcome.peer.role == .client ? TransportLimits.defaults.maxRequestsInFlight : nil,
            logger: logger
        )
        await withDiscardingTaskGroup { group in
            group.addTask { await onConnection(connection) }
            await connection.serve(inbound: Remainder(iterator: frames), handler: handler)
        }
    }

    package func withConnection<T: Sendable>(
        to address: NodeAddress,
        handshake: Handshake,
        handler: any EnvelopeHandler,
        logger: Logger,
        _ body: @escaping @Sendable (PeerConnection) async throws -> T
    ) async throws -> T {
        let link = try network.connect(from: name, to: address)
        let outbound = link.outbound(from: .dialer)
        defer { outbound.finish() }
        try await outbound.write(handshake.hello(requestID: 0))
        var frames = link.inbound(at: .dialer).makeAsyncIterator()
        guard let first = try await frames.next() else {
            throw WireError(.unavailable, "\(address) closed the connection during the handshake")
        }
        let outcome = try handshake.acceptHelloAck(first, certificate: network.certificate(of: link.listener))
        let connection = PeerConnection(
            peer: outcome.peer,
            remoteAddress: address.description,
            outbound: outbound,
            connected: true,
            logger: logger
        )
        return try await connection.serving(Remainder(iterator: frames), handler: handler, body)
    }
}

/// The frames of a connection after its handshake frame.
// SAFETY: the iterator passes from the handshake to the one task that serves the connection and is
// never used by two tasks at once.
private struct Remainder: AsyncSequence, @unchecked Sendable {
    let iterator: AsyncThrowingStream<Tessera_V1_Envelope, any Error>.Iterator

    func makeAsyncIterator() -> AsyncThrowingStream<Tessera_V1_Envelope, any Error>.Iterator { iterator }
}

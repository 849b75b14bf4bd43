import ClusterSecurity
import ClusterTransport
import ClusterWire
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing

/// A listener bounds what peers hold: connections that never finish the handshake, connections in
/// all and per peer, and a client's requests in flight.
@Suite struct TransportLimitsTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    /// Answers heartbeats once `gate` opens, counting how many wait at once.
    final class GatedHandler: EnvelopeHandler {
        let active = Atomic<Int>(0)
        let peak = Atomic<Int>(0)
        let open = Atomic<Bool>(false)

        func handle(
            _ request: Tessera_V1_Envelope,
            from connection: PeerConnection
        ) async throws
            -> Tessera_V1_Envelope.OneOf_Body?
        {
            let now = active.add(1, ordering: .relaxed).newValue
            peak.max(now, ordering: .relaxed)
            defer { active.subtract(1, ordering: .relaxed) }
            while !open.load(ordering: .relaxed) { try await Task.sleep(for: .milliseconds(5)) }
            return .heartbeatAck(Tessera_V1_HeartbeatAck())
        }
    }

    static func withListener(
        _ limits: TransportLimits,
        handler: any EnvelopeHandler = GatedHandler(),
        _ body: @escaping @Sendable (Int) async throws -> Void
    ) async throws {
        let (ports, port) = AsyncStream.makeStream(of: Int.self)
        try await withThrowingTaskGroup(of: Void.self) { group in
            defer { group.cancelAll() }
            group.addTask {
                try await Transport.listen(
                    on: NodeAddress(host: "127.0.0.1", port: 0),
                    handshake: Handshake(local: NodeIdentity(role: .worker, nodeID: "worker-1", incarnation: 1)),
                    security: .insecure,
                    maxFrameBytes: 1 << 20,
                    limits: limits,
                    handler: handler,
                    logger: Self.logger,
                    onBound: { port.yield($0) }
                )
            }
            var bound = ports.makeAsyncIterator()
            try await body(try #require(await bound.next()))
        }
    }

    /// A raw connection (no handshake of ours), so the test decides every frame sent.
    static func raw<T: Sendable>(
        _ port: Int,
        _ body: (NIOAsyncChannelInboundStream<Tessera_V1_Envelope>, NIOAsyncChannelOutboundWriter<Tessera_V1_Envelope>)
            async throws -> T
    ) async throws -> T {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addWireHandlers(maxFrameBytes: 1 << 20)
                    return try Transport.WireChannel(wrappingChannelSynchronously: channel)
                }
            }
        return try await channel.executeThenClose { inbound, outbound in try await body(inbound, outbound) }
    }

    static let hello = Handshake(local: NodeIdentity(role: .client, nodeID: "client-1", incarnation: 1)).hello()

    @Test(.timeLimit(.minutes(1)))
    func aSilentConnectionIsClosedAfterTheHandshakeTimeout() async throws {
        var limits = TransportLimits()
        limits.handshakeTimeout = .milliseconds(200)
        try await Self.withListener(limits) { port in
            let start = ContinuousClock.now
            let first = try await Self.raw(port) { inbound, _ in
                var frames = inbound.makeAsyncIterator()
                return try await frames.next()
            }
            #expect(first == nil, "the server sent \(String(describing: first))")
            #expect(ContinuousClock.now - start < .seconds(20))
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func connectionsPastTheLimitAreClosedAtOnce() async throws {
        var limits = TransportLimits()
        limits.maxConnections = 2
        try await Self.withListener(limits) { port in
            try await Self.raw(port) { _, firstOut in
                try await Self.raw(port) { inbound, _ in
                    // Two connections are held (no Hello yet); a third is closed without waiting.
                    try await Self.raw(port) { inbound, outbound in
                        try await outbound.write(Self.hello)
                        var frames = inbound.makeAsyncIterator()
                        let answer = try? await frames.next()
                        #expect(answer == nil, "a third connection was served: \(String(describing: answer))")
                    }
                }
                // Once the server has seen one close, a new connection is served.
                _ = try await eventually("a connection served again") {
                    try await Self.raw(port) { inbound, outbound in
                        try await outbound.write(Self.hello)
                        var frames = inbound.makeAsyncIterator()
                        let answer = try? await frames.next()
                        return answer?.bodyName == "hello_ack" ? true : nil
                    }
                }
                _ = firstOut
            }
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func aPeerGetsAtMostItsShareOfConnections() async throws {
        var limits = TransportLimits()
        limits.maxConnectionsPerPeer = 1
        try await Self.withListener(limits) { port in
            try await Self.raw(port) { firstIn, firstOut in
                try await firstOut.write(Self.hello)
                var first = firstIn.makeAsyncIterator()
                #expect(try await first.next()?.bodyName == "hello_ack")
                try await Self.raw(port) { inbound, outbound in
                    try await outbound.write(Self.hello)
                    var frames = inbound.makeAsyncIterator()
                    let answer = try #require(try await frames.next())
                    guard case .error(let error) = answer.body else {
                        Issue.record("a second connection of client-1 was accepted: \(answer.bodyName)")
                        return
                    }
                    #expect(WireError(proto: error).code == .resourceExhausted, "\(WireError(proto: error))")
                }
            }
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func aClientThatPipelinesIsReadOnlyAsFastAsItIsServed() async throws {
        var limits = TransportLimits()
        limits.maxRequestsInFlight = 4
        let handler = GatedHandler()
        try await Self.withListener(limits, handler: handler) { port in
            try await Self.raw(port) { inbound, outbound in
                try await outbound.write(Self.hello)
                var frames = inbound.makeAsyncIterator()
                #expect(try await frames.next()?.bodyName == "hello_ack")
                let requests = 50
                for id in 0..<requests {
                    try await outbound.write(
                        Tessera_V1_Envelope(requestID: UInt64(2 * id + 1), .heartbeat(Tessera_V1_Heartbeat()))
                    )
                }
                // Every request was sent; only four are taken while none is answered.
                _ = try await eventually("four requests in the handler") {
                    handler.active.load(ordering: .relaxed) == 4 ? true : nil
                }
                for _ in 0..<20 {
                    #expect(handler.active.load(ordering: .relaxed) <= 4)
                    try await Task.sleep(for: .milliseconds(10))
                }
                handler.open.store(true, ordering: .relaxed)
                var answered = 0
                while answered < requests, let reply = try await frames.next() {
                    #expect(reply.bodyName == "heartbeat_ack")
                    answered += 1
                }
                #expect(answered == requests)
                #expect(handler.peak.load(ordering: .relaxed) == 4)
            }
        }
    }
}

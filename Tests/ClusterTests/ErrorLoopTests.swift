import ClusterSecurity
import ClusterTransport
import ClusterWire
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing

/// An `Error` or a reply that answers no request is never answered, and a refused one-way message
/// gets no `Error` back: otherwise two peers that refuse each other's frames answer each other
/// forever (seen between a worker and the coordinator over a refused LayerStats, ~11,000 frames a
/// second each way).
@Suite struct ErrorLoopTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    /// Refuses everything but heartbeats, as the coordinator refuses statistics of an unadmitted
    /// sequence; counts what it was handed.
    final class RefusingHandler: EnvelopeHandler {
        let handled = Atomic<Int>(0)

        func handle(
            _ request: Tessera_V1_Envelope,
            from connection: PeerConnection
        ) async throws
            -> Tessera_V1_Envelope.OneOf_Body?
        {
            handled.add(1, ordering: .relaxed)
            guard case .heartbeat(let beat) = request.body else {
                throw WireError(.unknownSequence, "sequence 99 is not open")
            }
            var ack = Tessera_V1_HeartbeatAck()
            ack.sequenceNumber = beat.sequenceNumber
            return .heartbeatAck(ack)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func refusedOneWayMessagesAndStrayErrorsAreNotAnswered() async throws {
        let handler = RefusingHandler()
        try await withRawConnection(to: handler) { frames, outbound in
            var stats = Tessera_V1_LayerStats()
            stats.sequenceID = 99
            try await outbound.write(Tessera_V1_Envelope(requestID: 1, .layerStats(stats)))
            try await outbound.write(
                Tessera_V1_Envelope(requestID: 3, error: WireError(.unknownSequence, "a stray error"))
            )
            var beat = Tessera_V1_Heartbeat()
            beat.sequenceNumber = 7
            try await outbound.write(Tessera_V1_Envelope(requestID: 5, .heartbeat(beat)))

            // The only frames back are the heartbeats' acks: no Error for the refused statistics,
            // no answer to the stray error (a second round trip gives either time to show up).
            let first = try #require(try await frames.next())
            #expect(first.requestID == 5 && first.bodyName == "heartbeat_ack", "\(first)")
            beat.sequenceNumber = 8
            try await outbound.write(Tessera_V1_Envelope(requestID: 7, .heartbeat(beat)))
            let second = try #require(try await frames.next())
            #expect(second.requestID == 7 && second.bodyName == "heartbeat_ack", "\(second)")
        }
        // The stray error never reached the handler; the statistics and the heartbeats did.
        #expect(handler.handled.load(ordering: .relaxed) == 3)
    }

    /// A request that arrives again on its connection (a frame delivered twice) is dropped: the
    /// handler runs once and one answer goes back, so its effects cannot happen twice.
    @Test(.timeLimit(.minutes(1)))
    func aRequestRepeatedOnItsConnectionIsHandledOnce() async throws {
        let handler = RefusingHandler()
        try await withRawConnection(to: handler) { frames, outbound in
            var beat = Tessera_V1_Heartbeat()
            beat.sequenceNumber = 7
            try await outbound.write(Tessera_V1_Envelope(requestID: 5, .heartbeat(beat)))
            try await outbound.write(Tessera_V1_Envelope(requestID: 5, .heartbeat(beat)))
            beat.sequenceNumber = 8
            try await outbound.write(Tessera_V1_Envelope(requestID: 7, .heartbeat(beat)))
            // In order on one connection: had the repeat been answered, its ack would come before 7's.
            let first = try #require(try await frames.next())
            let second = try #require(try await frames.next())
            #expect([first.requestID, second.requestID] == [5, 7], "\(first) \(second)")
        }
        #expect(handler.handled.load(ordering: .relaxed) == 2)
    }

    /// Runs `body` on a raw connection to a coordinator served by `handler`, after a worker's Hello,
    /// so that every frame the server sends is seen (a PeerConnection would drop stray replies itself).
    private func withRawConnection(
        to handler: RefusingHandler,
        _ body: (
            inout NIOAsyncChannelInboundStream<Tessera_V1_Envelope>.AsyncIterator,
            NIOAsyncChannelOutboundWriter<Tessera_V1_Envelope>
        ) async throws -> Void
    ) async throws {
        let (ports, port) = AsyncStream.makeStream(of: Int.self)
        try await withThrowingTaskGroup(of: Void.self) { group in
            defer { group.cancelAll() }
            group.addTask {
                try await Transport.listen(
                    on: NodeAddress(host: "127.0.0.1", port: 0),
                    handshake: Handshake(
                        local: NodeIdentity(role: .coordinator, nodeID: "coordinator", incarnation: 1)
                    ),
                    security: .insecure,
                    maxFrameBytes: 1 << 20,
                    handler: handler,
                    logger: Self.logger,
                    onBound: { port.yield($0) }
                )
            }
            var bound = ports.makeAsyncIterator()
            let address = try #require(await bound.next())
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: "127.0.0.1", port: address) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addWireHandlers(maxFrameBytes: 1 << 20)
                        return try Transport.WireChannel(wrappingChannelSynchronously: channel)
                    }
                }
            try await channel.executeThenClose { inbound, outbound in
                var frames = inbound.makeAsyncIterator()
                let worker = Handshake(local: NodeIdentity(role: .worker, nodeID: "worker-1", incarnation: 1))
                try await outbound.write(worker.hello(requestID: 0))
                #expect(try await frames.next()?.body?.kind == .reply)
                try await body(&frames, outbound)
            }
        }
    }
}

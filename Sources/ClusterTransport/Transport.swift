import ClusterAdmin
public import ClusterWire
package import Logging
package import NIOCore
import NIOPosix

/// Where a node listens or connects: host and port.
public struct NodeAddress: Sendable, Hashable, Codable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses `host:port`; the error names what is allowed.
    public init(parsing text: String) throws(WireError) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (0...65535).contains(port), colon != text.startIndex
        else {
            throw WireError(.badRequest, "address '\(text)' must be host:port with a port in 0...65535")
        }
        self.init(host: String(text[..<colon]), port: port)
    }

    public var description: String { "\(host):\(port)" }
}

/// Listening and connecting with the wire protocol: frame codec, Hello exchange, then a `PeerConnection`.
package enum Transport {
    package typealias WireChannel = NIOAsyncChannel<Tessera_V1_Envelope, Tessera_V1_Envelope>

    /// Socket reads grow up to 1 MiB while frames are large (NIO's default stops at 64 KiB, so a
    /// 4 MiB prefill frame took 64 reads, each a pass through the pipeline), and shrink back for
    /// small messages.
    static let receiveBuffers = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 1 << 20)

    /// Binds `address` (port 0 picks a free one), reports the bound port through `onBound`, and serves
    /// every accepted connection in its own child task until cancelled. A failing connection never
    /// stops the listener. With `faults`, every accepted connection applies its current plan.
    package static func listen(
        on address: NodeAddress, handshake: Handshake, maxFrameBytes: Int, handler: any EnvelopeHandler,
        logger: Logger, faults: FaultInjector? = nil, onBound: @Sendable (Int) async -> Void,
        onConnection: @escaping @Sendable (PeerConnection) async -> Void = { _ in }
    ) async throws {
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.recvAllocator, value: Self.receiveBuffers)
            .bind(host: address.host, port: address.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addWireHandlers(maxFrameBytes: maxFrameBytes)
                    if let faults { try channel.pipeline.syncOperations.addFaultInjection(faults) }
                    return try WireChannel(wrappingChannelSynchronously: channel)
                }
            }
        await onBound(server.channel.localAddress?.port ?? address.port)
        try await server.serveUntilCancelled { channel in
            await accept(channel, handshake: handshake, handler: handler, logger: logger, onConnection: onConnection)
        }
    }

    private static func accept(
        _ channel: WireChannel, handshake: Handshake, handler: any EnvelopeHandler, logger: Logger,
        onConnection: @escaping @Sendable (PeerConnection) async -> Void
    ) async {
        let remote = channel.channel.remoteAddress?.description ?? "?"
        do {
            try await channel.executeThenClose { inbound, outbound in
                var iterator = inbound.makeAsyncIterator()
                guard let first = try await iterator.next() else { return }
                let outcome: HandshakeOutcome
                do {
                    outcome = try handshake.acceptHello(first)
                } catch {
                    try await outbound.write(Tessera_V1_Envelope(
                        requestID: first.requestID, error: error as? WireError ?? WireError(.badRequest, "\(error)")))
                    return
                }
                try await outbound.write(handshake.helloAck(for: outcome, requestID: first.requestID))
                let connection = PeerConnection(
                    peer: outcome.peer, remoteAddress: remote, outbound: outbound, connected: false, logger: logger)
                await withDiscardingTaskGroup { group in
                    group.addTask { await onConnection(connection) }
                    await connection.serve(inbound: Rest(iterator: iterator), handler: handler)
                }
            }
        } catch {
            logger.debug("connection failed", metadata: ["peer.address": "\(remote)", "error": "\(error)"])
        }
    }

    /// Connects to `address`, exchanges Hello, and runs `body` with the connection while serving the
    /// peer's requests with `handler`. The connection closes when `body` returns. With `faults`, the
    /// connection applies its current plan.
    package static func withConnection<T: Sendable>(
        to address: NodeAddress, handshake: Handshake, maxFrameBytes: Int, handler: any EnvelopeHandler,
        logger: Logger, faults: FaultInjector? = nil, _ body: @escaping @Sendable (PeerConnection) async throws -> T
    ) async throws -> T {
        let channel = try await connect(to: address, maxFrameBytes: maxFrameBytes, faults: faults)
        return try await channel.executeThenClose { inbound, outbound in
            var iterator = inbound.makeAsyncIterator()
            try await outbound.write(handshake.hello(requestID: 0))
            guard let first = try await iterator.next() else {
                throw WireError(.unavailable, "\(address) closed the connection during the handshake")
            }
            let rest = Rest(iterator: iterator)
            let outcome = try handshake.acceptHelloAck(first)
            let connection = PeerConnection(
                peer: outcome.peer, remoteAddress: address.description, outbound: outbound, connected: true,
                logger: logger)
            return try await withThrowingTaskGroup(of: T?.self) { group in
                group.addTask {
                    await connection.serve(inbound: rest, handler: handler)
                    return nil
                }
                group.addTask { try await body(connection) }
                defer { group.cancelAll() }
                while let result = try await group.next() {
                    if let value = result { return value }
                    // The peer went away first; `body` sees its requests fail and finishes.
                }
                throw WireError(.unavailable, "connection to \(address) ended")
            }
        }
    }

    private static func connect(
        to address: NodeAddress, maxFrameBytes: Int, faults: FaultInjector?
    ) async throws -> WireChannel {
        do {
            return try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelOption(.recvAllocator, value: Self.receiveBuffers)
                .connect(host: address.host, port: address.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addWireHandlers(maxFrameBytes: maxFrameBytes)
                        if let faults { try channel.pipeline.syncOperations.addFaultInjection(faults) }
                        return try WireChannel(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            throw WireError(.unavailable, "cannot connect to \(address): \(error)", cause: error)
        }
    }
}

/// The rest of an inbound stream after the handshake frame, as an AsyncSequence again.
// SAFETY: the iterator is handed from the handshake code to the one task that serves the connection
// and is never used by two tasks at once.
struct Rest: AsyncSequence, @unchecked Sendable {
    typealias Element = Tessera_V1_Envelope
    let iterator: NIOAsyncChannelInboundStream<Tessera_V1_Envelope>.AsyncIterator

    func makeAsyncIterator() -> NIOAsyncChannelInboundStream<Tessera_V1_Envelope>.AsyncIterator { iterator }
}

import ClusterAdmin
package import ClusterSecurity
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
    /// stops the listener. With `faults`, every accepted connection applies its current plan. Over
    /// mutual TLS, a peer's Hello must claim the role and node id its certificate names.
    package static func listen(
        on address: NodeAddress,
        handshake: Handshake,
        security: TransportSecurity,
        maxFrameBytes: Int,
        limits: TransportLimits = .defaults,
        handler: any EnvelopeHandler,
        logger: Logger,
        faults: FaultInjector? = nil,
        onBound: @Sendable (Int) async -> Void,
        onConnection: @escaping @Sendable (PeerConnection) async -> Void = { _ in }
    ) async throws {
        let counter = ConnectionCounter(limits: limits)
        let budget = FrameBudget(limit: limits.maxBufferedFrameBytes)
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.recvAllocator, value: Self.receiveBuffers)
            .bind(host: address.host, port: address.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers(
                        IdleStateHandler(allTimeout: TimeAmount(limits.idleTimeout)),
                        CloseWhenIdle()
                    )
                    if case .mutualTLS(let credentials) = security {
                        try channel.pipeline.syncOperations.addHandler(credentials.serverHandler())
                    }
                    try channel.pipeline.syncOperations.addWireHandlers(maxFrameBytes: maxFrameBytes, budget: budget)
                    if let faults { try channel.pipeline.syncOperations.addFaultInjection(faults) }
                    return try WireChannel(wrappingChannelSynchronously: channel)
                }
            }
        await onBound(server.channel.localAddress?.port ?? address.port)
        try await server.serveUntilCancelled { channel in
            await accept(
                channel,
                handshake: handshake,
                security: security,
                limits: limits,
                counter: counter,
                handler: handler,
                logger: logger,
                onConnection: onConnection
            )
        }
    }

    private static func accept(
        _ channel: WireChannel,
        handshake: Handshake,
        security: TransportSecurity,
        limits: TransportLimits,
        counter: ConnectionCounter,
        handler: any EnvelopeHandler,
        logger: Logger,
        onConnection: @escaping @Sendable (PeerConnection) async -> Void
    ) async {
        let remote = channel.channel.remoteAddress?.description ?? "?"
        do {
            try await channel.executeThenClose { inbound, outbound in
                guard counter.open() else {
                    logger.warning(
                        "connection refused: too many connections",
                        metadata: ["peer.address": "\(remote)", "limit": "\(limits.maxConnections)"]
                    )
                    return
                }
                defer { counter.close() }
                // A peer that connects and says nothing (or stalls the TLS handshake) is cut off.
                let handshakeDeadline = channel.channel.eventLoop.scheduleTask(in: TimeAmount(limits.handshakeTimeout))
                {
                    channel.channel.close(promise: nil)
                }
                var iterator = inbound.makeAsyncIterator()
                guard let first = try await iterator.next() else { return }
                let outcome: HandshakeOutcome
                let certificate: PeerCertificate?
                do {
                    // The first frame arrives only after the TLS handshake, so the certificate is known.
                    certificate = try await security.peerCertificate(of: channel.channel)
                    outcome = try handshake.acceptHello(first, certificate: certificate?.identity)
                } catch {
                    logger.warning(
                        "handshake refused",
                        metadata: ["peer.address": "\(remote)", "error": "\(error)"]
                    )
                    try await outbound.write(
                        Tessera_V1_Envelope(
                            requestID: first.requestID,
                            error: error as? WireError ?? WireError(.badRequest, "\(error)")
                        )
                    )
                    return
                }
                handshakeDeadline.cancel()
                guard counter.admit(outcome.peer.nodeID) else {
                    try await outbound.write(
                        Tessera_V1_Envelope(
                            requestID: first.requestID,
                            error: WireError(
                                .resourceExhausted,
                                "\(outcome.peer.nodeID) already has \(limits.maxConnectionsPerPeer) connections to this node",
                                retryAfter: .seconds(1)
                            )
                        )
                    )
                    return
                }
                defer { counter.leave(outcome.peer.nodeID) }
                try await outbound.write(handshake.helloAck(for: outcome, requestID: first.requestID))
                let connection = PeerConnection(
                    peer: outcome.peer,
                    remoteAddress: remote,
                    outbound: ChannelOutbound(writer: outbound, eventLoop: channel.channel.eventLoop),
                    connected: false,
                    // Only clients: cluster nodes send requests both ways on one connection, and a
                    // handler awaiting the peer's reply must never wait behind the reading it holds up.
                    maxRequestsInFlight: outcome.peer.role == .client ? limits.maxRequestsInFlight : nil,
                    certificate: certificate,
                    logger: logger
                )
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
    /// connection applies its current plan. Over mutual TLS, the peer's HelloAck must name the role
    /// and node id of its certificate.
    package static func withConnection<T: Sendable>(
        to address: NodeAddress,
        handshake: Handshake,
        security: TransportSecurity,
        maxFrameBytes: Int,
        handler: any EnvelopeHandler,
        logger: Logger,
        faults: FaultInjector? = nil,
        _ body: @escaping @Sendable (PeerConnection) async throws -> T
    ) async throws -> T {
        let channel = try await connect(to: address, security: security, maxFrameBytes: maxFrameBytes, faults: faults)
        return try await channel.executeThenClose { inbound, outbound in
            var iterator = inbound.makeAsyncIterator()
            let mode = if case .mutualTLS = security { "over mutual TLS" } else { "in plaintext (--insecure)" }
            let first: Tessera_V1_Envelope?
            do {
                try await outbound.write(handshake.hello(requestID: 0))
                first = try await iterator.next()
            } catch {
                throw WireError(
                    .unavailable,
                    "the handshake with \(address) \(mode) failed: \(error); does it use the same cluster CA?",
                    cause: error
                )
            }
            guard let first else {
                throw WireError(
                    .unavailable,
                    "\(address) closed the connection during the handshake \(mode); does it run with the same security?"
                )
            }
            let rest = Rest(iterator: iterator)
            // A refusal is reported as the peer sent it: having refused, the peer may already have
            // closed the connection, and its certificate could no longer be read.
            let certificate: PeerCertificate? =
                if case .error = first.body { nil } else { try await security.peerCertificate(of: channel.channel) }
            let outcome = try handshake.acceptHelloAck(first, certificate: certificate?.identity)
            let connection = PeerConnection(
                peer: outcome.peer,
                remoteAddress: address.description,
                outbound: ChannelOutbound(writer: outbound, eventLoop: channel.channel.eventLoop),
                connected: true,
                certificate: certificate,
                logger: logger
            )
            return try await connection.serving(rest, handler: handler, body)
        }
    }

    private static func connect(
        to address: NodeAddress,
        security: TransportSecurity,
        maxFrameBytes: Int,
        faults: FaultInjector?
    ) async throws -> WireChannel {
        do {
            return try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelOption(.recvAllocator, value: Self.receiveBuffers)
                .connect(host: address.host, port: address.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if case .mutualTLS(let credentials) = security {
                            try channel.pipeline.syncOperations.addHandler(try credentials.clientHandler())
                        }
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

package import ClusterWire
package import Logging
import Synchronization

/// One connection per worker address, opened on first use and kept until the pool's scope ends.
/// Each connection runs as a child task of `withPool`, so none outlives it.
package final class ConnectionPool: Sendable {
    private enum Entry {
        case connecting([CheckedContinuation<PeerConnection, any Error>])
        case ready(PeerConnection)
    }

    private let entries = Mutex<[NodeAddress: Entry]>([:])
    private let opens: AsyncStream<NodeAddress>.Continuation

    private init(opens: AsyncStream<NodeAddress>.Continuation) { self.opens = opens }

    /// Runs `body` with a pool whose connections answer what peers send on them with `handler`
    /// (by default, refusing it).
    package static func withPool<T: Sendable>(
        network: any Network,
        handshake: Handshake,
        handler: any EnvelopeHandler = RefuseRequests(),
        logger: Logger,
        _ body: @escaping @Sendable (ConnectionPool) async throws -> T
    ) async throws -> T {
        let (stream, continuation) = AsyncStream.makeStream(of: NodeAddress.self)
        let pool = ConnectionPool(opens: continuation)
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask {
                await withDiscardingTaskGroup { connections in
                    for await address in stream {
                        connections.addTask {
                            await pool.hold(
                                address,
                                network: network,
                                handshake: handshake,
                                handler: handler,
                                logger: logger
                            )
                        }
                    }
                }
                return nil
            }
            defer {
                continuation.finish()
                group.cancelAll()
            }
            let result = try await body(pool)
            return result
        }
    }

    /// The connection to `address`, opening it if needed.
    package func connection(to address: NodeAddress) async throws -> PeerConnection {
        try await withCheckedThrowingContinuation { continuation in
            let open = entries.withLock { entries -> Bool in
                switch entries[address] {
                case .ready(let connection) where !connection.isClosed:
                    continuation.resume(returning: connection)
                    return false
                case .connecting(var waiting):
                    waiting.append(continuation)
                    entries[address] = .connecting(waiting)
                    return false
                case .ready, nil:
                    // A closed connection's holder may not have let go of it yet: connect anew.
                    entries[address] = .connecting([continuation])
                    return true
                }
            }
            if open { opens.yield(address) }
        }
    }

    /// Opens the connection and keeps it until the pool is cancelled or the peer goes away.
    private func hold(
        _ address: NodeAddress,
        network: any Network,
        handshake: Handshake,
        handler: any EnvelopeHandler,
        logger: Logger
    ) async {
        var failure = WireError(.unavailable, "cannot connect to \(address)")
        do {
            try await network.withConnection(
                to: address,
                handshake: handshake,
                handler: handler,
                logger: logger
            ) { connection in
                let waiting = self.entries.withLock { entries -> [CheckedContinuation<PeerConnection, any Error>] in
                    defer { entries[address] = .ready(connection) }
                    if case .connecting(let waiting) = entries[address] { return waiting }
                    return []
                }
                for waiter in waiting { waiter.resume(returning: connection) }
                // Held until the peer closes it (the next request reconnects) or the pool's scope ends.
                await connection.waitUntilClosed()
                self.entries.withLock { entries in
                    if case .ready(let held) = entries[address], held === connection { entries[address] = nil }
                }
            }
            return
        } catch {
            logger.debug("connection ended", metadata: ["peer.address": "\(address)", "error": "\(error)"])
            // Waiters learn why (a refused handshake says which certificate or claim was wrong).
            failure =
                error as? WireError ?? WireError(.unavailable, "cannot connect to \(address): \(error)", cause: error)
        }
        // The attempt failed before connecting: its waiters learn why.
        let waiting = entries.withLock { entries -> [CheckedContinuation<PeerConnection, any Error>] in
            guard case .connecting(let waiting) = entries[address] else { return [] }
            entries[address] = nil
            return waiting
        }
        for waiter in waiting { waiter.resume(throwing: failure) }
    }
}

/// A handler for connections that only send requests: anything the peer asks is refused.
package struct RefuseRequests: EnvelopeHandler {
    package init() {}

    package func handle(
        _ request: Tessera_V1_Envelope,
        from connection: PeerConnection
    ) async throws
        -> Tessera_V1_Envelope.OneOf_Body?
    {
        throw WireError(.badRequest, "this peer does not accept \(request.bodyName)")
    }
}

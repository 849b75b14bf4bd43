package import ClusterSecurity
package import ClusterWire
package import Logging
import NIOCore

/// Where a node listens and connects, and the clock its timers and loops run on. Services take one
/// so the same code runs over TCP (`TCPNetwork`) and inside the simulator, which connects nodes in
/// memory on a simulated clock.
package protocol Network: Sendable {
    /// Times request deadlines, heartbeats, retries and backoffs.
    var clock: any Clock<Duration> { get }

    /// Serves connections to `address` until cancelled (see `Transport.listen`).
    func listen(
        on address: NodeAddress,
        handshake: Handshake,
        handler: any EnvelopeHandler,
        logger: Logger,
        onBound: @escaping @Sendable (Int) async -> Void,
        onConnection: @escaping @Sendable (PeerConnection) async -> Void
    ) async throws

    /// Connects to `address` and runs `body` with the connection (see `Transport.withConnection`).
    func withConnection<T: Sendable>(
        to address: NodeAddress,
        handshake: Handshake,
        handler: any EnvelopeHandler,
        logger: Logger,
        _ body: @escaping @Sendable (PeerConnection) async throws -> T
    ) async throws -> T
}

extension Network {
    package func listen(
        on address: NodeAddress,
        handshake: Handshake,
        handler: any EnvelopeHandler,
        logger: Logger,
        onBound: @escaping @Sendable (Int) async -> Void
    ) async throws {
        try await listen(
            on: address,
            handshake: handshake,
            handler: handler,
            logger: logger,
            onBound: onBound,
            onConnection: { _ in }
        )
    }

    /// How long this network's clock has run since the call, as a function (for state that is
    /// handed its time rather than reading a clock).
    package func elapsedTime() -> @Sendable () -> Duration { Self.elapsed(on: clock) }

    private static func elapsed<C: Clock<Duration>>(on clock: C) -> @Sendable () -> Duration {
        let start = clock.now
        return { start.duration(to: clock.now) }
    }
}

/// TCP sockets with the wire codec, over mutual TLS or (with `--insecure`) plaintext.
package struct TCPNetwork: Network {
    package var security: TransportSecurity
    package var maxFrameBytes: Int
    package var limits: TransportLimits
    /// Applied to every connection this node accepts (not to those it opens).
    package var faults: FaultInjector?

    package init(
        security: TransportSecurity,
        maxFrameBytes: Int,
        limits: TransportLimits = .defaults,
        faults: FaultInjector? = nil
    ) {
        self.security = security
        self.maxFrameBytes = maxFrameBytes
        self.limits = limits
        self.faults = faults
    }

    package var clock: any Clock<Duration> { ContinuousClock() }

    package func listen(
        on address: NodeAddress,
        handshake: Handshake,
        handler: any EnvelopeHandler,
        logger: Logger,
        onBound: @escaping @Sendable (Int) async -> Void,
        onConnection: @escaping @Sendable (PeerConnection) async -> Void
    ) async throws {
        try await Transport.listen(
            on: address,
            handshake: handshake,
            security: security,
            maxFrameBytes: maxFrameBytes,
            limits: limits,
            handler: handler,
            logger: logger,
            faults: faults,
            onBound: onBound,
            onConnection: onConnection
        )
    }

    package func withConnection<T: Sendable>(
        to address: NodeAddress,
        handshake: Handshake,
        handler: any EnvelopeHandler,
        logger: Logger,
        _ body: @escaping @Sendable (PeerConnection) async throws -> T
    ) async throws -> T {
        try await Transport.withConnection(
            to: address,
            handshake: handshake,
            security: security,
            maxFrameBytes: maxFrameBytes,
            handler: handler,
            logger: logger,
            body
        )
    }
}

/// What a `PeerConnection` writes through, and the timer that ends its requests' waits.
package protocol FrameOutbound: Sendable {
    func write(_ envelope: Tessera_V1_Envelope) async throws
    /// Writes `envelopes` in order, flushed together where the transport can (one system call for a
    /// batch of small frames instead of one each).
    func write(contentsOf envelopes: [Tessera_V1_Envelope]) async throws
    /// No more writes: the peer sees the end of the stream.
    func finish()
    /// Runs `action` after `delay` unless the returned handle is cancelled first.
    func schedule(after delay: Duration, _ action: @escaping @Sendable () -> Void) -> any ScheduledAction
}

package protocol ScheduledAction: Sendable {
    func cancel()
}

extension FrameOutbound {
    package func write(contentsOf envelopes: [Tessera_V1_Envelope]) async throws {
        for envelope in envelopes { try await write(envelope) }
    }
}

/// A NIO channel's outbound writer, timed on the channel's event loop (a timer there rather than a
/// racing task: a request is the hot path of every decode step, and a task group with a sleeping
/// child cost two tasks and a timer each).
struct ChannelOutbound: FrameOutbound {
    let writer: NIOAsyncChannelOutboundWriter<Tessera_V1_Envelope>
    let eventLoop: any EventLoop

    func write(_ envelope: Tessera_V1_Envelope) async throws { try await writer.write(envelope) }

    func write(contentsOf envelopes: [Tessera_V1_Envelope]) async throws {
        try await writer.write(contentsOf: envelopes)
    }

    func finish() { writer.finish() }

    func schedule(after delay: Duration, _ action: @escaping @Sendable () -> Void) -> any ScheduledAction {
        eventLoop.scheduleTask(in: TimeAmount(delay), action)
    }
}

extension Scheduled: ScheduledAction {}

/// Protections the simulator can switch off, one at a time, to show that its invariants catch the
/// defect each one prevents (`tessera simulate --weaken NAME`). Never off in a real process.
package enum Protection: String, CaseIterable, Sendable {
    /// A primary answers a decode step only once every replica applied it.
    case replicateBeforeAck = "ack-before-replicating"
    /// A coordinator that replaces another admits nothing until the workers that outlived its
    /// predecessor have re-registered and their copies are charged.
    case rebuildBeforeAdmitting = "admit-while-rebuilding"
    /// The coordinator takes a layer's statistics only from a worker that holds a copy of the layer.
    case statisticsFromHolders = "stats-from-any-node"

    /// The name `--weaken` takes: what the system does without the protection.
    package var weakness: String { rawValue }
}

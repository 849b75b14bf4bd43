import ClusterAdmin
package import ClusterSecurity
package import ClusterWire
package import Logging
import Metrics
import Synchronization
import Tracing

/// Answers requests that arrive on a connection. Returning nil sends nothing back (for one-way
/// messages); throwing a `WireError` sends it as an error frame with the request's id.
package protocol EnvelopeHandler: Sendable {
    func handle(
        _ request: Tessera_V1_Envelope,
        from connection: PeerConnection
    ) async throws -> Tessera_V1_Envelope.OneOf_Body?
}

/// A handshaken connection that carries requests both ways, several in flight at once: a request
/// gets a fresh id (odd from the side that connected, even from the side that accepted, so the two
/// never collide) and the reply with the same id resumes its caller.
package final class PeerConnection: Sendable {
    /// Unanswerable frames (stray replies, refused one-way messages), logged once in a while per
    /// connection: the listener's connection caps bound how many connections can log at once, and
    /// one connection's flood cannot hide another's first warning.
    private let unanswered = RateLimitedLog()
    /// The request counters and timers of this connection's answers, by type and outcome.
    private let metrics = MetricHandles()

    package let peer: NodeIdentity
    package let remoteAddress: String
    private let outbound: any FrameOutbound
    private let state: Mutex<State>
    private let logger: Logger
    /// Bounds the peer's requests handled at once (see `TransportLimits.maxRequestsInFlight`).
    private let requestSlots: AsyncSlots?
    /// The peer's certificate over mutual TLS: once it is revoked, the peer's next frame ends the
    /// connection.
    private let certificate: PeerCertificate?

    /// A request in flight: registered before it is written, so that a fast reply finds it.
    private enum Slot {
        case awaiting(CheckedContinuation<Tessera_V1_Envelope, any Error>?)
        case arrived(Tessera_V1_Envelope)
        /// Timed out or cancelled before the request began waiting.
        case failed(WireError)
    }

    private struct State {
        var nextID: UInt64
        var pending: [UInt64: Slot] = [:]
        var closed = false
        var closeWaiters: [CheckedContinuation<Void, Never>] = []
        /// The peer's latest request ids, to drop one that arrives again.
        var requestsSeen = RecentRequestIDs()

        /// The next id of this side's parity.
        mutating func takeID() -> UInt64 {
            defer { nextID += 2 }
            return nextID
        }
    }

    package init(
        peer: NodeIdentity,
        remoteAddress: String,
        outbound: any FrameOutbound,
        connected: Bool,
        maxRequestsInFlight: Int? = nil,
        certificate: PeerCertificate? = nil,
        logger: Logger
    ) {
        self.peer = peer
        self.certificate = certificate
        self.remoteAddress = remoteAddress
        self.outbound = outbound
        self.logger = logger
        requestSlots = maxRequestsInFlight.map(AsyncSlots.init)
        state = Mutex(State(nextID: connected ? 1 : 2))
    }

    /// Sends `body` and waits for the reply; an error frame is thrown as its `WireError`.
    package func request(
        _ body: Tessera_V1_Envelope.OneOf_Body,
        timeout: Duration = .seconds(30)
    ) async throws -> Tessera_V1_Envelope.OneOf_Body {
        let id = try state.withLock { state throws(WireError) in
            guard !state.closed else { throw WireError(.unavailable, "connection to \(peer) is closed") }
            let id = state.takeID()
            state.pending[id] = .awaiting(nil)
            return id
        }
        var envelope = Tessera_V1_Envelope(requestID: id, body)
        envelope.injectCurrentTrace()
        // A literal: the error texts that name the request are built only when one is thrown.
        let name = body.name
        do {
            try await outbound.write(envelope)
        } catch {
            _ = state.withLock { $0.pending.removeValue(forKey: id) }
            throw WireError(.unavailable, "cannot send \(name) to \(peer): \(error)", cause: error)
        }
        let deadline = outbound.schedule(after: timeout) {
            self.fail(id: id, WireError(.unavailable, "\(name) to \(self.peer): no answer within \(timeout)"))
        }
        defer { deadline.cancel() }
        let reply = try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation {
                (continuation: CheckedContinuation<Tessera_V1_Envelope, any Error>) in
                let early: Result<Tessera_V1_Envelope, WireError>? = self.state.withLock { state in
                    switch state.pending[id] {
                    case .arrived(let reply):
                        state.pending[id] = nil
                        return .success(reply)
                    case .failed(let error):
                        state.pending[id] = nil
                        return .failure(error)
                    case .awaiting:
                        state.pending[id] = .awaiting(continuation)
                        return nil
                    case nil:
                        return .failure(WireError(.unavailable, "connection to \(self.peer) closed"))
                    }
                }
                if let early { continuation.resume(with: early) }
            }
        } onCancel: {
            self.fail(id: id, WireError(.unavailable, "request \(id) to \(self.peer) was cancelled"))
        }
        if case .error(let error) = reply.body { throw WireError(proto: error) }
        guard let body = reply.body else {
            throw WireError(.malformedFrame, "reply \(id) from \(peer) has no body")
        }
        return body
    }

    /// Sends a one-way message (no reply expected).
    package func notify(_ body: Tessera_V1_Envelope.OneOf_Body) async throws {
        try await notify([body])
    }

    /// Sends one-way messages in order, flushed together: a batch of small messages costs the
    /// connection one write instead of one each.
    package func notify(_ bodies: [Tessera_V1_Envelope.OneOf_Body]) async throws {
        let ids = state.withLock { state in bodies.map { _ in state.takeID() } }
        let envelopes = zip(ids, bodies).map { id, body in
            var envelope = Tessera_V1_Envelope(requestID: id, body)
            envelope.injectCurrentTrace()
            return envelope
        }
        try await outbound.write(contentsOf: envelopes)
    }

    /// Ends request `id` with `error`; one still being set up keeps the error until it waits.
    private func fail(id: UInt64, _ error: WireError) {
        let continuation: CheckedContinuation<Tessera_V1_Envelope, any Error>? = state.withLock { state in
            switch state.pending[id] {
            case .awaiting(let continuation?):
                state.pending[id] = nil
                return continuation
            case .awaiting(nil):
                state.pending[id] = .failed(error)
                return nil
            case .arrived, .failed, nil:
                return nil
            }
        }
        continuation?.resume(throwing: error)
    }

    /// Hands a reply to its waiting request; false if `envelope` is not a reply to one of ours.
    private func deliver(_ envelope: Tessera_V1_Envelope) -> Bool {
        let continuation: CheckedContinuation<Tessera_V1_Envelope, any Error>?? = state.withLock { state in
            switch state.pending[envelope.requestID] {
            case .awaiting(let continuation?):
                state.pending[envelope.requestID] = nil
                return .some(continuation)
            case .awaiting(nil):
                state.pending[envelope.requestID] = .arrived(envelope)
                return .some(nil)
            case .arrived, .failed, nil:
                return nil
            }
        }
        guard let continuation else { return false }
        continuation?.resume(returning: envelope)
        return true
    }

    /// Whether the connection has closed (the peer went away, or the stream broke).
    package var isClosed: Bool { state.withLock { $0.closed } }

    /// Returns once the connection is closed (or the caller is cancelled, which closes it).
    package func waitUntilClosed() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let closed = state.withLock { state in
                    if !state.closed { state.closeWaiters.append(continuation) }
                    return state.closed
                }
                if closed { continuation.resume() }
            }
        } onCancel: {
            self.close(WireError(.unavailable, "connection to \(self.peer) was given up"))
        }
    }

    /// Marks the connection closed and fails every request still waiting.
    package func close(_ error: WireError) {
        let (waiting, closeWaiters) = state.withLock { state in
            state.closed = true
            defer {
                state.pending = [:]
                state.closeWaiters = []
            }
            let requests = state.pending.values.compactMap { slot in
                if case .awaiting(let continuation?) = slot { return continuation }
                return nil
            }
            return (requests, state.closeWaiters)
        }
        for continuation in waiting { continuation.resume(throwing: error) }
        for waiter in closeWaiters { waiter.resume() }
    }

    /// Reads until the peer goes away: replies resume their requests, requests go to `handler`, each
    /// in its own child task so a slow one does not hold up the rest. A reply that matches no
    /// request of ours (an `Error` to a one-way message, a late answer) is dropped, never answered.
    package func serve<Inbound: AsyncSequence<Tessera_V1_Envelope, any Error>>(
        inbound: Inbound,
        handler: any EnvelopeHandler
    ) async {
        var closeReason = WireError(.unavailable, "connection to \(peer) closed")
        await withDiscardingTaskGroup { group in
            do {
                for try await envelope in inbound {
                    if let refusal = certificate?.refusal() { throw refusal }
                    if deliver(envelope) { continue }
                    if envelope.requestID == 0, case .error(let error) = envelope.body {
                        // The peer says why it is about to close the connection; requests in flight fail
                        // as unavailable (they may be retried elsewhere) with that reason.
                        let reason = WireError(proto: error)
                        closeReason = WireError(.unavailable, "\(peer) closed the connection: \(reason)", cause: reason)
                        logger.warning(
                            "the peer is closing the connection",
                            metadata: ["peer.id": "\(peer)", "error": "\(reason)"]
                        )
                        continue
                    }
                    if envelope.body?.kind == .reply {
                        self.unanswered.warning(
                            "stray-\(envelope.bodyName)",
                            "dropped a reply that answers no request of ours",
                            metadata: [
                                "peer.id": "\(peer)", "type": "\(envelope.bodyName)",
                                "request.id": "\(envelope.requestID)",
                            ],
                            logger: logger
                        )
                        continue
                    }
                    guard state.withLock({ $0.requestsSeen.insert(envelope.requestID) }) else {
                        self.unanswered.warning(
                            "repeated-\(envelope.bodyName)",
                            "dropped a request that repeats one this connection already carried",
                            metadata: [
                                "peer.id": "\(peer)", "type": "\(envelope.bodyName)",
                                "request.id": "\(envelope.requestID)",
                            ],
                            logger: logger
                        )
                        continue
                    }
                    // Waiting for a slot stops reading: the peer's bytes stay in its socket, not here.
                    await requestSlots?.acquire()
                    group.addTask {
                        defer { self.requestSlots?.release() }
                        await self.answer(envelope, handler: handler)
                    }
                }
            } catch let error as WireError {
                // The byte stream can no longer be trusted: say why, then close.
                logger.warning("closing connection", metadata: ["peer.id": "\(peer)", "error": "\(error)"])
                try? await outbound.write(Tessera_V1_Envelope(requestID: 0, error: error))
                closeReason = error
            } catch {
                logger.debug("connection ended", metadata: ["peer.id": "\(peer)", "error": "\(error)"])
            }
            outbound.finish()
            close(closeReason)
            group.cancelAll()
        }
    }

    /// Serves the peer's frames (`inbound`, after the handshake) while `body` runs with this
    /// connection, as the side that connected does; returns what `body` returns.
    package func serving<T: Sendable, Inbound: AsyncSequence<Tessera_V1_Envelope, any Error> & Sendable>(
        _ inbound: Inbound,
        handler: any EnvelopeHandler,
        _ body: @escaping @Sendable (PeerConnection) async throws -> T
    ) async throws -> T {
        try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask {
                await self.serve(inbound: inbound, handler: handler)
                return nil
            }
            group.addTask { try await body(self) }
            defer { group.cancelAll() }
            while let result = try await group.next() {
                if let value = result { return value }
                // The peer went away first; `body` sees its requests fail and finishes.
            }
            throw WireError(.unavailable, "connection to \(remoteAddress) ended")
        }
    }

    private func spanAttributes(_ request: Tessera_V1_Envelope) -> SpanAttributes {
        var attributes: SpanAttributes = [
            "rpc.system": "tessera", "rpc.method": .string(request.bodyName), "tessera.peer": .string(peer.nodeID),
        ]
        if let sequenceID = request.body?.sequenceID { attributes["tessera.sequence.id"] = "\(sequenceID)" }
        return attributes
    }

    private func answer(_ request: Tessera_V1_Envelope, handler: any EnvelopeHandler) async {
        let start = ContinuousClock.now
        let type = request.bodyName
        var outcome = "ok"
        defer {
            metrics.counter(TesseraMetrics.requestsTotal, dimensions: [("type", type), ("outcome", outcome)])
                .increment()
            metrics.timer(TesseraMetrics.requestDurationSeconds, dimensions: [("type", type)])
                .recordInterval(since: start)
        }
        let reply: Tessera_V1_Envelope
        do {
            let answer = try await withSpan(
                type,
                continuing: request.traceContext,
                ofKind: .server,
                attributes: self.spanAttributes(request)
            ) { try await handler.handle(request, from: self) }
            guard let body = answer else { return }
            reply = Tessera_V1_Envelope(requestID: request.requestID, body)
        } catch let error as WireError where request.body?.kind == .oneWay {
            // The sender expects nothing back; an Error would only start an exchange of errors.
            outcome = error.code.description
            self.unanswered.warning(
                "refused-\(type)-\(error.code)",
                "refused a one-way message",
                metadata: ["peer.id": "\(peer)", "type": "\(type)", "error": "\(error)"],
                logger: logger
            )
            return
        } catch let error as WireError {
            outcome = error.code.description
            reply = Tessera_V1_Envelope(requestID: request.requestID, error: error)
        } catch is CancellationError {
            outcome = "cancelled"
            return
        } catch {
            outcome = "INTERNAL"
            reply = Tessera_V1_Envelope(requestID: request.requestID, error: WireError(.internal, "\(error)"))
        }
        do {
            try await outbound.write(reply)
        } catch {
            logger.debug("reply not sent", metadata: ["peer.id": "\(peer)", "error": "\(error)"])
        }
    }
}

/// Runs `body`, failing with `WireError.unavailable` if it takes longer than `timeout` on `clock`.
package func withDeadline<T: Sendable>(
    _ timeout: Duration,
    on clock: any Clock<Duration> = ContinuousClock(),
    what: String,
    _ body: @escaping @Sendable () async throws -> T,
    onTimeout: @escaping @Sendable () -> Void = {}
) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await clock.sleep(for: timeout)
            return nil
        }
        defer { group.cancelAll() }
        while let result = try await group.next() {
            if let value = result { return value }
            onTimeout()
            throw WireError(.unavailable, "\(what): no answer within \(timeout)")
        }
        throw CancellationError()
    }
}

extension Metrics.Timer {
    func recordInterval(since start: ContinuousClock.Instant) {
        let elapsed = ContinuousClock.now - start
        let (seconds, attoseconds) = elapsed.components
        recordNanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }
}

/// The ids of the last requests a peer sent on one connection. A request that repeats one of them (a
/// frame delivered twice, or replayed by a faulty peer) is dropped: the first one's answer answers
/// it, and running it again could repeat its effects or answer out of order. TCP never delivers a
/// frame twice and senders number requests afresh, so a working peer never meets this.
struct RecentRequestIDs {
    /// Ids remembered: far more than `TransportLimits.maxRequestsInFlight`, so a repeat is caught
    /// while its first is answered and for a while after.
    static let kept = 1024
    private var ring: [UInt64] = []
    private var oldest = 0
    private var members: Set<UInt64> = []

    /// Remembers `id`; false if it is remembered already.
    mutating func insert(_ id: UInt64) -> Bool {
        guard members.insert(id).inserted else { return false }
        if ring.count < Self.kept {
            ring.append(id)
        } else {
            members.remove(ring[oldest])
            ring[oldest] = id
            oldest = (oldest + 1) % Self.kept
        }
        return true
    }
}

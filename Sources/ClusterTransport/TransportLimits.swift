import NIOCore
import Synchronization

/// What one process's listener lets its peers hold: connections, time, and requests in flight. A
/// peer past a limit is refused or disconnected; it cannot starve the process or its heartbeats.
public struct TransportLimits: Sendable, Hashable {
    /// Time from accepting a connection to a completed Hello (TLS included); then it is closed.
    public var handshakeTimeout: Duration = .seconds(10)
    /// A connection with no frame either way for this long is closed (peers reconnect on demand).
    public var idleTimeout: Duration = .seconds(300)
    /// Connections open at once, handshaking or not.
    public var maxConnections = 1024
    /// Connections open at once from one node id (by its certificate).
    public var maxConnectionsPerPeer = 64
    /// Requests of one client connection being handled at once; beyond it the connection is not read
    /// until one finishes, so a client that pipelines requests without reading replies is slowed, not
    /// queued.
    public var maxRequestsInFlight = 64
    /// Bytes of incomplete frames larger than 64 KiB the listener buffers, over all its connections
    /// (four of the largest frames); a frame that does not fit is refused and its connection closed.
    public var maxBufferedFrameBytes = 256 << 20

    public init() {}

    public static let defaults = TransportLimits()
}

/// Counts a listener's connections, in all and per peer node id.
final class ConnectionCounter: Sendable {
    private let limits: TransportLimits
    private let state = Mutex<(total: Int, perPeer: [String: Int])>((0, [:]))

    init(limits: TransportLimits) { self.limits = limits }

    /// Counts a new connection; false (and not counted) when the process already has the most it takes.
    func open() -> Bool {
        state.withLock { state in
            guard state.total < limits.maxConnections else { return false }
            state.total += 1
            return true
        }
    }

    func close() { state.withLock { $0.total -= 1 } }

    /// Counts a handshaken connection against its peer; false (and not counted) past the peer's limit.
    func admit(_ nodeID: String) -> Bool {
        state.withLock { state in
            guard state.perPeer[nodeID, default: 0] < limits.maxConnectionsPerPeer else { return false }
            state.perPeer[nodeID, default: 0] += 1
            return true
        }
    }

    func leave(_ nodeID: String) {
        state.withLock { state in
            state.perPeer[nodeID, default: 1] -= 1
            if state.perPeer[nodeID] == 0 { state.perPeer[nodeID] = nil }
        }
    }
}

/// A count of free slots that tasks wait for in arrival order.
final class AsyncSlots: Sendable {
    private let state: Mutex<(free: Int, waiters: [CheckedContinuation<Void, Never>])>

    init(_ count: Int) { state = Mutex((count, [])) }

    func acquire() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let acquired = state.withLock { state in
                guard state.free > 0 else {
                    state.waiters.append(continuation)
                    return false
                }
                state.free -= 1
                return true
            }
            if acquired { continuation.resume() }
        }
    }

    func release() {
        let next = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard !state.waiters.isEmpty else {
                state.free += 1
                return nil
            }
            return state.waiters.removeFirst()
        }
        next?.resume()
    }
}

/// Closes the connection when `IdleStateHandler` reports no traffic either way.
final class CloseWhenIdle: ChannelInboundHandler, Sendable {
    typealias InboundIn = NIOAny

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }
}

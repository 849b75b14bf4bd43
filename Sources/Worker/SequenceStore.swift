import ClusterWire
import Synchronization

/// A worker's `WorkerState` behind a lock, for its handlers: each decision is one short critical
/// section, and one that must wait parks the caller until the sequence changes, then decides again.
final class SequenceStore: Sendable {
    private let state = Mutex(WorkerState())

    init() {}

    /// Runs one decision.
    func withLock<Value: Sendable, Failure: Error>(
        _ decide: (inout WorkerState) throws(Failure) -> Value
    ) throws(Failure) -> Value {
        try state.withLock { state throws(Failure) in try decide(&state) }
    }

    /// Runs `decide` until it is ready, parking in between on the place in line it returned. A wait
    /// cut short (the caller's task cancelled) is `UNAVAILABLE`: the peer may retry.
    func waiting<Value: Sendable>(
        for decide: (inout WorkerState) throws -> Waitable<Value>
    ) async throws -> Value {
        while true {
            switch try withLock(decide) {
            case .ready(let value):
                return value
            case .wait(let ticket):
                do {
                    try await ticket.wait()
                } catch let error as WireError {
                    throw error
                } catch {
                    throw WireError(.unavailable, "stopped waiting: \(error)")
                }
            }
        }
    }
}

/// Callers parked until something happens to a sequence, each resumed exactly once: when it happens
/// (`resumeAll`), when the sequence goes (`failAll`), or when the caller's task is cancelled (a
/// deadline gave up on it), which resumes it at once from the cancelling side, starting no task.
///
/// A caller takes a `Ticket` while it still holds the lock under which it found it must wait, and
/// parks on it after letting go: a `resumeAll` in between ends the ticket, so the wait returns at
/// once instead of missing it.
final class Waiters: Sendable {
    /// A place in line.
    struct Ticket: Sendable {
        fileprivate let waiters: Waiters
        fileprivate let id: UInt64

        /// Parks until the ticket is resumed; returns at once if it was already.
        func wait() async throws { try await waiters.wait(id) }
    }

    private struct State {
        var next: UInt64 = 0
        /// Tickets not resumed yet, with the caller's continuation once it parked.
        var pending: [UInt64: CheckedContinuation<Void, any Error>?] = [:]
        var failure: WireError?
    }

    private let state = Mutex(State())

    func ticket() -> Ticket {
        state.withLock { state in
            state.next += 1
            state.pending[state.next] = .some(nil)
            return Ticket(waiters: self, id: state.next)
        }
    }

    private func wait(_ id: UInt64) async throws {
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let outcome: Result<Void, any Error>? = state.withLock { state in
                    if let failure = state.failure {
                        state.pending[id] = nil
                        return .failure(failure)
                    }
                    guard state.pending.index(forKey: id) != nil else { return .success(()) }
                    if Task.isCancelled {
                        state.pending[id] = nil
                        return .failure(CancellationError())
                    }
                    state.pending[id] = continuation
                    return nil
                }
                if let outcome { continuation.resume(with: outcome) }
            }
        } onCancel: {
            state.withLock { $0.pending.removeValue(forKey: id) }??.resume(throwing: CancellationError())
        }
    }

    /// Ends every ticket taken so far, resuming the callers parked on them.
    func resumeAll() {
        for waiter in take() { waiter.resume() }
    }

    /// Fails every ticket taken so far, and every later one, with `error`.
    func failAll(_ error: WireError) {
        state.withLock { $0.failure = error }
        for waiter in take() { waiter.resume(throwing: error) }
    }

    private func take() -> [CheckedContinuation<Void, any Error>] {
        state.withLock { state in
            defer { state.pending = [:] }
            return state.pending.sorted { $0.key < $1.key }.compactMap(\.value)
        }
    }
}

import Dispatch

/// The threads one layer's work is split across (its KV heads are independent): how many, and what
/// runs them. The split depends on `count` alone, so results do not depend on the threads that run it.
///
/// `dispatch(_:)` borrows the system's shared threads, which run at the process's own priority. A
/// caller whose threads run at a lower one (a worker's prefill work) brings threads of its own in
/// that class, or the share it splits off would compete with the work that priority protects.
public struct ThreadTeam: Sendable, ExpressibleByIntegerLiteral {
    /// Runs `body(i)` for every `i` in `0..<count` at once and returns when all have returned.
    public typealias Fork = @Sendable (_ count: Int, _ body: @Sendable (Int) -> Void) -> Void

    /// How many workers share the work.
    public let count: Int
    private let fork: Fork

    /// `count` workers (at least one) that `fork` runs.
    public init(count: Int, fork: @escaping Fork) {
        self.count = max(1, count)
        self.fork = fork
    }

    /// `count` workers on the system's shared threads.
    public static func dispatch(_ count: Int) -> ThreadTeam {
        ThreadTeam(count: count) { count, body in DispatchQueue.concurrentPerform(iterations: count, execute: body) }
    }

    /// The calling thread alone.
    public static let single = ThreadTeam.dispatch(1)

    /// `dispatch(value)`, so that `threads: 2` reads as it always did.
    public init(integerLiteral value: Int) {
        self = .dispatch(value)
    }

    /// Runs `body(worker, workers)` for every worker of at most `limit` (inline for one).
    public func forEachWorker(limit: Int, _ body: @Sendable (_ worker: Int, _ workers: Int) -> Void) {
        let workers = max(1, min(count, limit))
        if workers == 1 {
            body(0, 1)
        } else {
            fork(workers) { body($0, workers) }
        }
    }
}

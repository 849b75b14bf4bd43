/// Where one open sequence's compression stands at the coordinator, as a state machine without I/O.
///
/// The layer statistics are gathered; once all have arrived a budget is allocated and sent to every
/// copy of every shard. The sequence counts as compressed only when every copy has applied it: an
/// assignment that failed on any copy goes back to be retried, at the same retention and after a
/// backoff, until every copy has (applying a budget a copy already holds changes nothing there). A
/// tightening under memory pressure is an assignment at a lower retention of a compressed sequence,
/// and follows the same path. One assignment is in flight at a time.
///
/// A compressed sequence may also be copied to restore its replication: while a copy is in flight it
/// is `copying`, still compressed, and it is not tightened (a copy taken while a tighter budget is on
/// its way would keep the looser one), nor copied a second time.
///
/// The shell feeds it events (`statisticsComplete`, `assignmentFinished`, `tick`, `tighten`,
/// `beginCopy`, `copyFinished`) and carries out the `Assign` actions it returns.
public struct BudgetLifecycle: Sendable, Hashable {
    public enum Phase: Sendable, Hashable {
        /// Statistics are still arriving; nothing has been allocated.
        case gathering
        /// A budget at `retention` is on its way to every copy (the `attempt`-th try at it).
        case assigning(retention: Double, attempt: Int)
        /// The last try at `retention` did not reach every copy; the next goes at `due`.
        case retrying(retention: Double, attempt: Int, due: ClusterInstant)
        /// Every copy has applied the budget at `retention`.
        case compressed(retention: Double)
        /// Compressed at `retention`, and shard copy `copy` is being made from it.
        case copying(retention: Double, copy: UInt64)
    }

    /// What the shell must do: allocate the budgets at `retention` from the statistics and send them
    /// to every copy of every shard, then report the outcome with `assignmentFinished`.
    public struct Assign: Sendable, Hashable {
        public var retention: Double

        public init(retention: Double) {
            self.retention = retention
        }
    }

    public private(set) var phase: Phase
    /// The retention the sequence was opened with: its first budget's.
    public let retention: Double

    /// The wait before retry `attempt` (1 for the first retry): 250 ms, doubling, at most 5 s.
    public static func backoff(attempt: Int) -> Duration {
        let doublings = min(max(attempt - 1, 0), 5)
        return min(.milliseconds(250 << doublings), .seconds(5))
    }

    /// A new sequence, gathering statistics, to be compressed to `retention`.
    public init(retention: Double) {
        self.retention = retention
        phase = .gathering
    }

    /// A sequence rebuilt from the workers' reports after a coordinator restart: compressed at
    /// `retention` when every copy reported so far said it was, gathering otherwise (the workers send
    /// their statistics again after registering, which completes it once more).
    public init(restoredCompressed compressed: Bool, retention: Double) {
        self.retention = retention
        phase = compressed ? .compressed(retention: retention) : .gathering
    }

    /// Whether every copy holds a budget: only then may the sequence be copied or tightened.
    public var isCompressed: Bool { compressedRetention != nil }

    /// The retention every copy holds, when compressed.
    public var compressedRetention: Double? {
        switch phase {
        case .compressed(let retention), .copying(let retention, _): retention
        case .gathering, .assigning, .retrying: nil
        }
    }

    /// Whether a shard copy of the sequence is in flight.
    public var isCopying: Bool {
        if case .copying = phase { return true }
        return false
    }

    /// Every layer's statistics are in: the first budget goes out. Any later call (statistics sent
    /// again by a restarted worker, or by every copy) changes nothing.
    public mutating func statisticsComplete() -> Assign? {
        guard case .gathering = phase else { return nil }
        phase = .assigning(retention: retention, attempt: 1)
        return Assign(retention: retention)
    }

    /// A registering copy reports that it holds no budget (its sequence was rebuilt as compressed
    /// from another copy's report): the budget must go out again once the statistics are complete.
    public mutating func copyUncompressed() {
        if isCompressed { phase = .gathering }
    }

    /// The assignment in flight ended: compressed when `everyCopyApplied`, otherwise retried at
    /// the same retention after `backoff(attempt:)`. Returns the phase it moved to.
    @discardableResult
    public mutating func assignmentFinished(everyCopyApplied: Bool, now: ClusterInstant) -> Phase {
        guard case .assigning(let retention, let attempt) = phase else { return phase }
        phase =
            everyCopyApplied
            ? .compressed(retention: retention)
            : .retrying(retention: retention, attempt: attempt, due: now + Self.backoff(attempt: attempt))
        return phase
    }

    /// Time passed: a retry that is due goes out.
    public mutating func tick(now: ClusterInstant) -> Assign? {
        guard case .retrying(let retention, let attempt, let due) = phase, due <= now else { return nil }
        phase = .assigning(retention: retention, attempt: attempt + 1)
        return Assign(retention: retention)
    }

    /// A shard copy `copy` starts from the compressed sequence; false (nothing changes) unless it is
    /// compressed with no copy in flight.
    public mutating func beginCopy(_ copy: UInt64) -> Bool {
        guard case .compressed(let retention) = phase else { return false }
        phase = .copying(retention: retention, copy: copy)
        return true
    }

    /// Shard copy `copy` ended, made or not: the sequence is compressed as before. Any other copy's
    /// end changes nothing (the sequence left the phase meanwhile, as when a registering copy
    /// reported no budget).
    public mutating func copyFinished(_ copy: UInt64) {
        guard case .copying(let retention, copy) = phase else { return }
        phase = .compressed(retention: retention)
    }

    /// Memory pressure: a compressed sequence is cut to `retention` (below what it holds). Nil
    /// while it is not compressed, a copy of it is in flight, or it is already at or below that
    /// retention.
    public mutating func tighten(to retention: Double) -> Assign? {
        guard case .compressed(let held) = phase, retention < held else { return nil }
        phase = .assigning(retention: retention, attempt: 1)
        return Assign(retention: retention)
    }
}

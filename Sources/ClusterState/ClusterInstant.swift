/// A point in time as the cluster state machines see it: nanoseconds since an origin the shell
/// chooses. The state machines never read a clock; the shell converts its own, for example
/// `ClusterInstant(elapsed: ContinuousClock.now - start)`, and tests pass whatever they like.
public struct ClusterInstant: Comparable, Hashable, Sendable, CustomStringConvertible {
    /// Nanoseconds since the origin.
    public var nanoseconds: UInt64

    public init(nanoseconds: UInt64) {
        self.nanoseconds = nanoseconds
    }

    /// The instant `elapsed` after the origin; a negative duration is the origin itself.
    public init(elapsed: Duration) {
        self.nanoseconds = UInt64(clamping: elapsed.clampedNanoseconds)
    }

    /// The origin.
    public static var zero: ClusterInstant { ClusterInstant(nanoseconds: 0) }

    /// This instant moved by `duration`, saturating at the origin and at `UInt64.max` nanoseconds.
    public func advanced(by duration: Duration) -> ClusterInstant {
        let delta = duration.clampedNanoseconds
        if delta >= 0 {
            let (sum, overflow) = nanoseconds.addingReportingOverflow(UInt64(delta))
            return ClusterInstant(nanoseconds: overflow ? .max : sum)
        }
        let magnitude = delta.magnitude
        return ClusterInstant(nanoseconds: nanoseconds > magnitude ? nanoseconds - magnitude : 0)
    }

    /// The time from `earlier` to this instant, or zero when `earlier` is not earlier (a shell whose
    /// clock is monotonic never passes one, but a state machine must not misbehave if it does).
    public func duration(since earlier: ClusterInstant) -> Duration {
        guard nanoseconds > earlier.nanoseconds else { return .zero }
        return .nanoseconds(Int64(clamping: nanoseconds - earlier.nanoseconds))
    }

    public static func < (lhs: ClusterInstant, rhs: ClusterInstant) -> Bool {
        lhs.nanoseconds < rhs.nanoseconds
    }

    public static func + (lhs: ClusterInstant, rhs: Duration) -> ClusterInstant {
        lhs.advanced(by: rhs)
    }

    public var description: String {
        let fraction = String(nanoseconds % 1_000_000_000)
        let padded = String(repeating: "0", count: 9 - fraction.count) + fraction
        return "t+\(nanoseconds / 1_000_000_000).\(padded)s"
    }
}

extension Duration {
    /// The duration in whole nanoseconds (truncated toward zero), clamped to `Int64`.
    var clampedNanoseconds: Int64 {
        let (seconds, attoseconds) = components
        let (scaled, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? .min : .max }
        let (sum, overflow2) = scaled.addingReportingOverflow(attoseconds / 1_000_000_000)
        if overflow2 { return attoseconds < 0 ? .min : .max }
        return sum
    }
}

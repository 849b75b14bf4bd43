/// When a worker gives its heap's free pages back to the kernel: once resident memory has exceeded
/// what it holds by more than an allowance for `decay` (1 s), checked at every heartbeat and after a
/// budget or a close frees rows, at most once per `interval`: a check sums the bytes of every
/// sequence held, and many small sequences closing at once would each pay it.
///
/// Freed tensors stay in the heap for reuse (`ProcessMemory.reuseLargeFrees`); giving them back at
/// once meant that a load test's churn (a sequence closes, the next one's prefill arrives) had every
/// prefill fault its memory in again, a zeroed page per 4 KiB at about 1.3 GB/s. Memory that stays
/// free for a second is returned, so the footprint a load test measures still follows what the
/// worker holds, within the decay and one heartbeat. The same reasoning as the decay of dirty pages
/// in jemalloc.
struct RetainedPages: Sendable {
    /// How long a surplus must last before the pages are given back.
    static let decay: Duration = .seconds(1)

    /// The least time between two checks; a tenth of the decay, so the wait is not lengthened much.
    static let interval: Duration = .milliseconds(100)

    /// Free heap memory kept for reuse, beyond what is held and what the process was resident with
    /// before holding anything: 64 MiB and 1/8 of the held bytes.
    static func allowance(held: Int) -> UInt64 { UInt64(64 << 20) + UInt64(held / 8) }

    /// When a surplus was first seen, since none was seen.
    private var surplusSince: Duration?
    /// When the last check was let through.
    private var checkedAt: Duration?

    /// Whether a check is due at `now` (`interval` after the last one); if so, it counts as made.
    mutating func due(at now: Duration) -> Bool {
        if let checkedAt, now - checkedAt < Self.interval { return false }
        checkedAt = now
        return true
    }

    /// Records one observation at `now` (any monotonic clock); true when the pages should be given
    /// back now. A surplus that disappears (the memory was reused) starts the wait over.
    mutating func observe(resident: UInt64, base: UInt64, held: Int, at now: Duration) -> Bool {
        guard resident > base + UInt64(held) + Self.allowance(held: held) else {
            surplusSince = nil
            return false
        }
        guard let since = surplusSince else {
            surplusSince = now
            return false
        }
        guard now - since >= Self.decay else { return false }
        surplusSince = nil
        return true
    }
}

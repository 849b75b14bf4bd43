import Synchronization

/// The bytes of incomplete large frames one process buffers across all its connections (see
/// `FrameDecoder`): what a peer can make it hold by declaring frames and sending them slowly.
public final class FrameBudget: Sendable {
    /// Frames up to this size are not counted: they are small enough to never matter, and counting
    /// them would cost an atomic operation on every read.
    public static let reservedAbove = 64 << 10

    public let limit: Int
    private let free: Atomic<Int>

    public init(limit: Int) {
        self.limit = limit
        free = Atomic(limit)
    }

    /// Bytes not reserved now.
    public var available: Int { free.load(ordering: .relaxed) }

    /// Reserves `bytes`; false (nothing reserved) when fewer are free.
    func take(_ bytes: Int) -> Bool {
        var current = free.load(ordering: .relaxed)
        while current >= bytes {
            let (exchanged, original) = free.compareExchange(
                expected: current,
                desired: current - bytes,
                ordering: .relaxed
            )
            if exchanged { return true }
            current = original
        }
        return false
    }

    func give(_ bytes: Int) { free.add(bytes, ordering: .relaxed) }
}

/// Microseconds of compute a sequence's prefill cost the workers before its first decode step:
/// expanding a synthetic prompt from its seed, the attention profiles its policy needs, and
/// compressing it to its first budget. A worker keeps one per shard and reports it with every
/// `DecodeResult`; the client adds up the shards'.
public struct PrefillWork: Sendable, Hashable {
    public var synthesisMicros: UInt64 = 0
    public var profileMicros: UInt64 = 0
    public var compressMicros: UInt64 = 0

    public init() {}

    package init(_ result: Tessera_V1_DecodeResult) {
        synthesisMicros = result.synthesisMicros
        profileMicros = result.profileMicros
        compressMicros = result.compressMicros
    }

    package func record(in result: inout Tessera_V1_DecodeResult) {
        result.synthesisMicros = synthesisMicros
        result.profileMicros = profileMicros
        result.compressMicros = compressMicros
    }

    /// Adds another shard's work; sums that overflow (only a broken or hostile peer reports such
    /// figures) stop at the largest value instead of trapping.
    public mutating func add(_ other: PrefillWork) {
        synthesisMicros = synthesisMicros.saturatingSum(other.synthesisMicros)
        profileMicros = profileMicros.saturatingSum(other.profileMicros)
        compressMicros = compressMicros.saturatingSum(other.compressMicros)
    }

    /// Runs `body`, adding the microseconds it took on `clock` to `total`. Workers pass their
    /// network's clock: a simulated run, whose compute takes no simulated time, then records 0, so
    /// messages that carry these figures (a primary's result forwarded to its replicas) are the same
    /// bytes in every replay.
    public static func timed<T, E: Error>(
        _ total: inout UInt64,
        on clock: some Clock<Duration>,
        _ body: () throws(E) -> T
    ) throws(E) -> T {
        let start = clock.now
        defer { total += start.duration(to: clock.now).wholeMicroseconds }
        return try body()
    }
}

extension Duration {
    /// Whole microseconds (the fraction dropped; a negative duration counts as 0): how the workers'
    /// prefill work and the load generator's latencies are recorded.
    package var wholeMicroseconds: UInt64 {
        let (seconds, attoseconds) = components
        return UInt64(max(0, seconds)) * 1_000_000 + UInt64(max(0, attoseconds) / 1_000_000_000_000)
    }
}

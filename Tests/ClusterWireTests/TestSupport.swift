import ClusterWire
import KVCacheCore
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A small deterministic generator (SplitMix64) so that randomized tests can be replayed.
///
/// The seed comes from `TESSERA_TEST_SEED` when set, else from the system generator; tests put it
/// in every failure message, so a failing run can be repeated with `TESSERA_TEST_SEED=<seed>`.
struct SeededGenerator: RandomNumberGenerator {
    let seed: UInt64
    private var state: UInt64

    init(seed: UInt64) {
        self.seed = seed
        self.state = seed
    }

    /// A generator seeded from the environment or at random.
    static func fromEnvironment() -> SeededGenerator {
        if let text = getenv("TESSERA_TEST_SEED").map({ String(cString: $0) }), let seed = UInt64(text) {
            return SeededGenerator(seed: seed)
        }
        return SeededGenerator(seed: UInt64.random(in: .min ... .max))
    }

    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func bytes(_ count: Int) -> [UInt8] {
        (0..<count).map { _ in UInt8.random(in: .min ... .max, using: &self) }
    }

    /// `count` floats in -4...4.
    mutating func floats(_ count: Int) -> [Float] {
        (0..<count).map { _ in Float.random(in: -4...4, using: &self) }
    }

    /// One layer's random prefill tensors: keys and values of `promptLength` positions, the last
    /// `queryRows` queries.
    mutating func prefill(geometry g: ModelGeometry, promptLength m: Int, queryRows: Int) throws -> LayerPrefill {
        try LayerPrefill(
            geometry: g,
            promptLength: m,
            keys: floats(g.kvHeads * m * g.headDim),
            values: floats(g.kvHeads * m * g.headDim),
            queries: floats(g.queryHeads * queryRows * g.headDim),
            queryRows: queryRows
        )
    }

    /// Describes the seed for failure messages.
    var replay: String { "TESSERA_TEST_SEED=\(self.seed)" }
}

/// Runs `body` and returns the `WireError` it throws (recording an issue if it throws something
/// else or nothing).
func wireError(
    _ comment: Comment? = nil,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws -> Void
) -> WireError? {
    do {
        try body()
        Issue.record(
            "expected a WireError, nothing was thrown. \(comment?.rawValue ?? "")",
            sourceLocation: sourceLocation
        )
        return nil
    } catch let error as WireError {
        return error
    } catch {
        Issue.record("expected a WireError, got \(error). \(comment?.rawValue ?? "")", sourceLocation: sourceLocation)
        return nil
    }
}

import KVKernels
import Testing

@testable import KVCacheCore

#if canImport(Glibc)
import Glibc
#endif

@Suite struct KernelTests {
    @Test func vectorExpMatchesLibm() {
        var x: Float = -80
        while x < 80 {
            let got = kvk_exp(x)
            let want = Float(Glibc.exp(Double(x)))
            #expect(abs(got - want) <= 4e-7 * want, "exp(\(x)) = \(got), want \(want)")
            x += 0.37
        }
        #expect(kvk_exp(-200) == 0)
    }

    /// Replicas compare digests: any one flipped bit, at any offset (each of the eight lanes, across
    /// the scramble after 16 stripes, the word tail and the byte tail), and any change of length
    /// must change the digest.
    @Test(arguments: [1, 7, 8, 31, 32, 33, 64, 100, 1000, 1100])
    func digestSeesEveryBitAndTheLength(count: Int) {
        var rng = SeededGenerator(seed: UInt64(count))
        let bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
        func digest(_ b: [UInt8], seed: UInt64 = 1) -> UInt64 {
            b.withUnsafeBytes { kvk_digest(seed, $0.baseAddress, $0.count) }
        }
        let reference = digest(bytes)
        #expect(digest(bytes) == reference)
        var seen: Set<UInt64> = [reference]
        for offset in 0..<count {
            for bit in [0, 3, 7] {
                var flipped = bytes
                flipped[offset] ^= 1 << bit
                seen.insert(digest(flipped))
            }
        }
        #expect(seen.count == 1 + 3 * count, "a flipped bit left the digest unchanged (seed \(count))")
        #expect(digest(bytes + [0]) != reference)
        #expect(digest(bytes, seed: 2) != reference)
    }

    @Test(arguments: [1, 15, 16, 17, 100, 257])
    func softmaxSumsToOneAndKeepsOrder(count: Int) {
        var rng = SeededGenerator(seed: UInt64(count))
        var s = rng.floats(count, scale: 20)
        let original = s
        let maxLogit = s.withUnsafeMutableBufferPointer { Kernels.softmax($0.baseAddress!, count: count) }
        #expect(maxLogit == original.max())
        #expect(abs(s.reduce(0, +) - 1) < 1e-5)
        let argmax = original.indices.max { original[$0] < original[$1] }!
        #expect(s.indices.max { s[$0] < s[$1] } == argmax)
    }

    /// Decode attention against a double-precision reference, in both storage types.
    @Test(arguments: [7, 16, 33, 128])
    func decodeAttentionMatchesReference(headDim d: Int) {
        let seed = UInt64(d)
        var rng = SeededGenerator(seed: seed)
        let rows = 300
        let keys = rng.floats(rows * d)
        let values = rng.floats(rows * d)
        let query = rng.floats(d, scale: 2)
        var logits = (0..<rows).map { j in
            (0..<d).reduce(0.0) { $0 + Double(query[$1]) * Double(keys[j * d + $1]) } / Double(d).squareRoot()
        }
        let maxLogit = logits.max()!
        logits = logits.map { Glibc.exp($0 - maxLogit) }
        let z = logits.reduce(0, +)
        let want = (0..<d).map { c in (0..<rows).reduce(0.0) { $0 + logits[$1] / z * Double(values[$1 * d + c]) } }
        var scratch = [Float](repeating: 0, count: rows)
        var out = [Float](repeating: 0, count: d)
        Kernels.decodeAttention(
            queries: query,
            keys: keys,
            values: values,
            rows: rows,
            headDim: d,
            scratch: &scratch,
            output: &out
        )
        for c in 0..<d { #expect(abs(Double(out[c]) - want[c]) < 1e-5, "seed \(seed) lane \(c)") }

        let keys16 = keys.map { Float16($0) }
        let values16 = values.map { Float16($0) }
        Kernels.decodeAttention(
            queries: query,
            keys: keys16,
            values: values16,
            rows: rows,
            headDim: d,
            scratch: &scratch,
            output: &out
        )
        for c in 0..<d { #expect(abs(Double(out[c]) - want[c]) < 2e-3, "f16 seed \(seed) lane \(c)") }
    }

    @Test func countBelowUsesRelativeThreshold() {
        let p: [Float] = [0.5, 0.004, 0.006, 0.2, 0.0049, 0.29, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.001]
        // Below 0.01 × 0.5 = 0.005: 0.004, 0.0049, the 10 zeros and 0.001.
        #expect(Kernels.countBelow(p, count: p.count, fractionOfMax: 0.01) == 13)
    }
}

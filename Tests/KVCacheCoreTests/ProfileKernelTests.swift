import Testing

@testable import KVCacheCore

#if canImport(Glibc)
import Glibc
#endif

/// The blocked profile (tiles of query rows against packed key panels, heads split across threads)
/// against a row-at-a-time double-precision reference.
@Suite struct ProfileKernelTests {
    /// Column sums and sparsity of the causal softmax, in Double, one row at a time.
    func reference(
        _ prefill: LayerPrefill,
        starts: [Int],
        sparsityStart: Int,
        threshold: Double
    ) -> (
        sums: [Int: [Double]], sparsity: [Double]
    ) {
        let g = prefill.geometry
        let m = prefill.promptLength
        let d = g.headDim
        var sums = [Int: [Double]]()
        for start in starts { sums[start] = [Double](repeating: 0, count: g.queryHeads * m) }
        var sparsity = [Double](repeating: 0, count: g.queryHeads)
        for h in 0..<g.queryHeads {
            var zeroed = 0
            var entries = 0
            for row in prefill.firstQueryRow..<m {
                let q = prefill.queryOffset(head: h, row: row)
                var logits = (0...row).map { j in
                    let keys = prefill.keys[h / g.groupSize]
                    return (0..<d).reduce(0.0) { $0 + Double(prefill.queries[q + $1]) * Double(keys[j * d + $1]) }
                        / Double(d).squareRoot()
                }
                let top = logits.max()!
                logits = logits.map { Glibc.exp($0 - top) }
                let z = logits.reduce(0, +)
                let p = logits.map { $0 / z }
                for start in starts where row >= start {
                    for j in 0...row { sums[start]![h * m + j] += p[j] }
                }
                if row >= sparsityStart {
                    let cut = threshold * p.max()!
                    zeroed += p.filter { $0 < cut }.count
                    entries += p.count
                }
            }
            sparsity[h] = Double(zeroed) / Double(max(1, entries))
        }
        return (sums, sparsity)
    }

    /// Prompt lengths around the tile (24 rows), row-group (6) and panel (16 keys) sizes, and head
    /// sizes that are not multiples of the vector width.
    @Test(arguments: [(1, 16), (5, 7), (23, 16), (25, 33), (70, 64), (97, 128)])
    func blockedProfileMatchesReference(m: Int, headDim: Int) throws {
        let seed = UInt64(m * 1000 + headDim)
        let g = geometry(layers: 1, queryHeads: 4, kvHeads: 2, headDim: headDim)
        let prefill = randomPrefill(g, m: m, seed: seed)
        let starts = Array(Set([0, m / 3, m - 1]))
        let requirements = ProfileRequirements(suffixStarts: Set(starts), sparsityStart: m / 2, sparsityThreshold: 0.01)
        let profile = try AttentionProfile(prefill: prefill, requirements: requirements)
        let want = reference(prefill, starts: starts, sparsityStart: m / 2, threshold: 0.01)
        for start in starts {
            let got = try #require(profile.columnSums[start])
            for i in got.indices {
                #expect(
                    abs(Double(got[i]) - want.sums[start]![i]) < 2e-5 * Double(m),
                    "seed \(seed) start \(start) i \(i)"
                )
            }
        }
        // A probability within rounding of the cut may land on either side.
        let entries = Double((m - m / 2) * (m + m / 2 + 1) / 2)
        for h in 0..<g.queryHeads {
            #expect(abs(profile.headSparsity[h] - want.sparsity[h]) <= 2 / entries, "seed \(seed) head \(h)")
        }
    }

    /// Replicas compare digests, so a profile must not depend on how many threads computed it.
    @Test func threadsDoNotChangeTheBits() throws {
        let g = geometry(layers: 1, queryHeads: 8, kvHeads: 4, headDim: 32)
        let prefill = randomPrefill(g, m: 150, seed: 11)
        let requirements = ProfileRequirements(suffixStarts: [0, 100, 140], sparsityStart: 120)
        let one = try AttentionProfile(prefill: prefill, requirements: requirements, threads: 1)
        for threads in [2, 3, 8] {
            let many = try AttentionProfile(prefill: prefill, requirements: requirements, threads: .dispatch(threads))
            #expect(many.columnSums == one.columnSums, "threads \(threads)")
            #expect(many.headSparsity == one.headSparsity, "threads \(threads)")
        }
    }
}

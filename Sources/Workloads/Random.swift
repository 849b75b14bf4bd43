import KVKernels

/// Random streams of the generator. Every draw goes through integer arithmetic and the
/// deterministic math in `DeterministicMath.swift`, never the platform's libm, so a layer expanded
/// on another machine or in another process gives the same floats bit for bit.

/// SplitMix64: expands one 64-bit seed into well-mixed words; used to seed the other generators and
/// to derive per-stream seeds.
package struct SplitMix64: Sendable {
    package var state: UInt64

    package init(state: UInt64) { self.state = state }

    @inline(__always)
    package mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// The independent random streams a trace is made of. A stream's seed depends only on the trace
/// seed, its kind and up to two indices (layer, head), so any one layer can be regenerated alone.
enum StreamKind: UInt64 {
    case sequence = 1
    case sparsityCurve
    case headPreference
    case retrievalHeads
    case layerPlan
    case rowTargets
    case decodeTargets
    case positional
    case keyNoise
    case valueNoise
    case queryNoise
    case decodeKeysValues
    case decodeQueries
    case needle

    /// The seed of stream `self` at indices `(a, b)` under `seed`.
    func seed(_ seed: UInt64, _ a: Int = 0, _ b: Int = 0) -> UInt64 {
        var mixer = SplitMix64(state: seed ^ (rawValue &* 0xD1B5_4A32_D192_ED03))
        mixer.state = mixer.next() ^ (UInt64(bitPattern: Int64(a)) &* 0x9E37_79B9_7F4A_7C15)
        mixer.state = mixer.next() ^ (UInt64(bitPattern: Int64(b)) &* 0xC2B2_AE3D_27D4_EB4F)
        return mixer.next()
    }
}

/// xoshiro256** for the structural draws (counts, subsets, gaps): one 64-bit word at a time.
struct StructureRNG {
    private var s0: UInt64
    private var s1: UInt64
    private var s2: UInt64
    private var s3: UInt64

    init(seed: UInt64) {
        var mixer = SplitMix64(state: seed)
        s0 = mixer.next()
        s1 = mixer.next()
        s2 = mixer.next()
        s3 = mixer.next()
    }

    @inline(__always)
    mutating func next() -> UInt64 {
        let result = rotateLeft(s1 &* 5, 7) &* 9
        let t = s1 << 17
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = rotateLeft(s3, 45)
        return result
    }

    @inline(__always)
    private func rotateLeft(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }

    /// Uniform in `0..<n` by the high word of a 64×64 product; the bias is below n/2⁶⁴.
    mutating func int(below n: Int) -> Int {
        precondition(n > 0, "int(below:) needs a positive bound, got \(n)")
        return Int(truncatingIfNeeded: next().multipliedFullWidth(by: UInt64(n)).high)
    }

    mutating func int(in range: ClosedRange<Int>) -> Int {
        range.lowerBound + int(below: range.upperBound - range.lowerBound + 1)
    }

    /// Uniform in [0, 1) with 53 random bits.
    mutating func uniform() -> Double { Double(next() >> 11) * 0x1p-53 }

    mutating func uniform(in range: ClosedRange<Double>) -> Double {
        range.lowerBound + (range.upperBound - range.lowerBound) * uniform()
    }

    mutating func bernoulli(_ p: Double) -> Bool { uniform() < p }

    /// A standard normal by Box–Muller (one of the pair; structural draws are rare).
    mutating func normal() -> Double {
        let u1 = (Double(next() >> 11) + 0.5) * 0x1p-53
        let u2 = uniform()
        return (-2 * DeterministicMath.log(u1)).squareRoot() * DeterministicMath.cosTwoPi(u2)
    }

    /// Symmetric Beta(α, α) by Jöhnk's method (exact for any α; efficient for α ≤ 2, which
    /// `TraceSettings.validate` enforces).
    mutating func symmetricBeta(_ alpha: Double) -> Double {
        let inverse = 1 / alpha
        while true {
            let x = DeterministicMath.exp(DeterministicMath.log(1 - uniform()) * inverse)
            let y = DeterministicMath.exp(DeterministicMath.log(1 - uniform()) * inverse)
            if x + y <= 1, x + y > 0 { return x / (x + y) }
        }
    }

    /// Fisher–Yates on the first `count` elements of `buffer`, stopping after the first `take`
    /// positions are final: they are then a uniform random subset in random order.
    mutating func partialShuffle<T>(_ buffer: UnsafeMutableBufferPointer<T>, count: Int, take: Int) {
        var i = 0
        while i < take && i < count - 1 {
            let j = i + int(below: count - i)
            buffer.swapAt(i, j)
            i += 1
        }
    }
}

/// Sixteen interleaved xoshiro256** generators feeding a vectorised Box–Muller transform: the bulk
/// source of standard normals (`kvk_normal_blocks`, the same bits on every CPU). Each step of the
/// sixteen lanes yields 32 normals; a fill that is not a multiple of 32 discards the rest of its last
/// block, so a stream's output depends only on the sequence of fill sizes.
struct NormalStream {
    private static let block = 2 * Int(KVK_NORMAL_LANES)
    private var state = kvk_normal_state()

    init(seed: UInt64) {
        var mixer = SplitMix64(state: seed)
        withUnsafeMutableBytes(of: &state) { raw in
            let words = raw.bindMemory(to: UInt64.self)
            let lanes = Int(KVK_NORMAL_LANES)
            for lane in 0..<lanes {
                for word in 0..<4 { words[word * lanes + lane] = mixer.next() }
            }
        }
    }

    /// Writes `count` standard normals to `out`.
    mutating func fill(_ out: UnsafeMutablePointer<Float>, count: Int) {
        let whole = count / Self.block
        kvk_normal_blocks(&state, out, whole)
        let rest = count - whole * Self.block
        if rest > 0 { lastBlock(into: out + whole * Self.block, from: 0, count: rest) }
    }

    mutating func fill(_ buffer: UnsafeMutableBufferPointer<Float>) {
        guard let base = buffer.baseAddress else { return }
        fill(base, count: buffer.count)
    }

    /// Writes normals `range` of the stream to `out` (`range.count` of them), exactly as `fill` of
    /// `range.upperBound` normals would have written them; the blocks wholly before the range only
    /// step the generators (no transform), which is what makes a suffix cheap.
    mutating func fill(_ out: UnsafeMutablePointer<Float>, range: Range<Int>) {
        kvk_normal_skip(&state, range.lowerBound / Self.block)
        let lead = range.lowerBound % Self.block
        guard lead > 0 else {
            fill(out, count: range.count)
            return
        }
        let taken = min(Self.block - lead, range.count)
        lastBlock(into: out, from: lead, count: taken)
        fill(out + taken, count: range.count - taken)
    }

    /// Normals `first ..< first + count` of the next block.
    private mutating func lastBlock(into out: UnsafeMutablePointer<Float>, from first: Int, count: Int) {
        withUnsafeTemporaryAllocation(of: Float.self, capacity: Self.block) { block in
            kvk_normal_blocks(&state, block.baseAddress!, 1)
            out.update(from: block.baseAddress! + first, count: count)
        }
    }

    /// A new array of `count` standard normals.
    mutating func normals(_ count: Int) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            fill(buffer)
            initialized = count
        }
    }
}

/// Random streams of the generator. Every draw goes through integer arithmetic and the
/// deterministic math in `DeterministicMath.swift`, never the platform's libm, so a layer expanded
/// on another machine or in another process gives the same floats bit for bit.

/// SplitMix64: expands one 64-bit seed into well-mixed words; used to seed the other generators and
/// to derive per-stream seeds.
struct SplitMix64 {
    var state: UInt64

    @inline(__always)
    mutating func next() -> UInt64 {
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
/// source of standard normals. Each 16-lane step yields 32 normals; a fill that is not a multiple
/// of 32 discards the rest of its last block, so a stream's output depends only on the sequence of
/// fill sizes.
struct NormalStream {
    private var s0 = SIMD16<UInt64>()
    private var s1 = SIMD16<UInt64>()
    private var s2 = SIMD16<UInt64>()
    private var s3 = SIMD16<UInt64>()

    init(seed: UInt64) {
        var mixer = SplitMix64(state: seed)
        for lane in 0..<16 {
            s0[lane] = mixer.next()
            s1[lane] = mixer.next()
            s2[lane] = mixer.next()
            s3[lane] = mixer.next()
        }
    }

    @inline(__always)
    private static func rotateLeft(_ x: SIMD16<UInt64>, _ k: UInt64) -> SIMD16<UInt64> {
        (x &<< k) | (x &>> (64 - k))
    }

    /// One step of all sixteen generators. Multiplications by 5 and 9 are written as shift-adds
    /// because AVX2 has no 64-bit vector multiply.
    @inline(__always)
    private mutating func nextWords() -> SIMD16<UInt64> {
        let times5 = (s1 &<< 2) &+ s1
        let rotated = Self.rotateLeft(times5, 7)
        let result = (rotated &<< 3) &+ rotated
        let t = s1 &<< 17
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = Self.rotateLeft(s3, 45)
        return result
    }

    /// 32 standard normals: Box–Muller on the two 32-bit halves of each 64-bit word (23 bits of
    /// each become a uniform).
    @inline(__always)
    private mutating func nextBlock() -> (SIMD16<Float>, SIMD16<Float>) {
        let halves = unsafeBitCast(nextWords(), to: SIMD32<UInt32>.self)
        let u1 = 1 - VectorMath.unitInterval(halves.evenHalf)  // in (0, 1], so the log is finite
        let u2 = VectorMath.unitInterval(halves.oddHalf)
        let radius = VectorMath.squareRoot(-2 * VectorMath.log(u1))
        let (sine, cosine) = VectorMath.sinCosTwoPi(u2)
        return (radius * cosine, radius * sine)
    }

    /// Writes `count` standard normals to `out`.
    mutating func fill(_ out: UnsafeMutablePointer<Float>, count: Int) {
        var i = 0
        while i + 32 <= count {
            let (a, b) = nextBlock()
            UnsafeMutableRawPointer(out + i).storeBytes(of: a, as: SIMD16<Float>.self)
            UnsafeMutableRawPointer(out + i + 16).storeBytes(of: b, as: SIMD16<Float>.self)
            i += 32
        }
        if i < count {
            let (a, b) = nextBlock()
            var lane = 0
            while i < count {
                out[i] = lane < 16 ? a[lane] : b[lane - 16]
                lane += 1
                i += 1
            }
        }
    }

    mutating func fill(_ buffer: UnsafeMutableBufferPointer<Float>) {
        guard let base = buffer.baseAddress else { return }
        fill(base, count: buffer.count)
    }

    /// Writes normals `range` of the stream to `out` (`range.count` of them), exactly as `fill` of
    /// `range.upperBound` normals would have written them; the blocks wholly before the range only
    /// step the generators (no transform), which is what makes a suffix cheap.
    mutating func fill(_ out: UnsafeMutablePointer<Float>, range: Range<Int>) {
        for _ in 0..<(range.lowerBound / 32) { _ = nextWords() }
        let lead = range.lowerBound % 32
        guard lead > 0 else {
            fill(out, count: range.count)
            return
        }
        // The block the range starts inside: its normals from `lead` on.
        let (a, b) = nextBlock()
        let taken = min(32 - lead, range.count)
        for i in 0..<taken { out[i] = lead + i < 16 ? a[lead + i] : b[lead + i - 16] }
        fill(out + taken, count: range.count - taken)
    }

    /// A new array of `count` standard normals.
    mutating func normals(_ count: Int) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            fill(buffer)
            initialized = count
        }
    }
}

// Imported only so that libm is linked: `squareRoot()` may lower to a call to `sqrt`. No libm
// function is called directly (see below).
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Elementary functions built from `+ − × ÷` and `squareRoot()` only. The platform libm may pick
/// different code paths per CPU (glibc dispatches on FMA support), which would break bit-identical
/// regeneration of a layer on another cluster node; these give the same bits everywhere.
enum DeterministicMath {
    private static let ln2High = 0.693_147_180_369_123_816_49
    private static let ln2Low = 1.908_214_929_270_587_7e-10
    private static let ln2 = 0.693_147_180_559_945_309_42

    /// `e^x` by range reduction to |r| ≤ ln2/2 and a degree-13 Taylor polynomial (error ≲ 1e-15).
    static func exp(_ x: Double) -> Double {
        if x.isNaN { return x }
        if x > 709 { return .infinity }
        if x < -745 { return 0 }
        let k = (x / ln2).rounded()
        let r = (x - k * ln2High) - k * ln2Low
        var term = 1.0
        var sum = 1.0
        for n in 1...13 {
            term *= r / Double(n)
            sum += term
        }
        return scaled(sum, byPowerOfTwo: Int(k))
    }

    private static func scaled(_ value: Double, byPowerOfTwo k: Int) -> Double {
        // Two steps keep 2^k representable near the subnormal and overflow edges.
        let half = k / 2
        return value * Double(sign: .plus, exponent: half, significand: 1)
            * Double(sign: .plus, exponent: k - half, significand: 1)
    }

    /// Natural log of a positive finite `x`: exponent plus 2·atanh((m−1)/(m+1)) with m in [√½, √2].
    static func log(_ x: Double) -> Double {
        precondition(x > 0 && x.isFinite, "log needs a positive finite argument, got \(x)")
        var exponent = Double(x.exponent)
        var m = x.significand
        if m > 1.414_213_562_373_095_1 {
            m *= 0.5
            exponent += 1
        }
        let u = (m - 1) / (m + 1)
        let u2 = u * u
        var power = u
        var sum = 0.0
        var n = 1.0
        while n <= 23 {
            sum += power / n
            power *= u2
            n += 2
        }
        return exponent * ln2 + 2 * sum
    }

    /// `(sin 2πu, cos 2πu)` for any finite `u`, by quadrant reduction and Taylor series on ±π/4.
    static func sinCosTwoPi(_ u: Double) -> (sin: Double, cos: Double) {
        let t = 4 * (u - u.rounded(.down))
        let quadrant = t.rounded()
        let a = (t - quadrant) * (Double.pi / 2)
        let a2 = a * a
        var sine = a
        var cosine = 1.0
        var sTerm = a
        var cTerm = 1.0
        var n = 1.0
        for _ in 0..<9 {
            sTerm *= -a2 / ((n + 1) * (n + 2))
            cTerm *= -a2 / (n * (n + 1))
            sine += sTerm
            cosine += cTerm
            n += 2
        }
        switch Int(quadrant) & 3 {
        case 0: return (sine, cosine)
        case 1: return (cosine, -sine)
        case 2: return (-sine, -cosine)
        default: return (-cosine, sine)
        }
    }

    static func cosTwoPi(_ u: Double) -> Double { sinCosTwoPi(u).cos }

    /// `erfc(x)` by the Chebyshev fit of Numerical Recipes (relative error below 1.2e-7).
    static func erfc(_ x: Double) -> Double {
        let z = abs(x)
        let t = 1 / (1 + 0.5 * z)
        var poly = 0.170_872_77
        for c in [-0.822_152_23, 1.488_515_87, -1.135_203_98, 0.278_868_07, -0.186_288_06, 0.096_784_18,
                  0.374_091_96, 1.000_023_68, -1.265_512_23] {
            poly = c + t * poly
        }
        let value = t * exp(-z * z + poly)
        return x >= 0 ? value : 2 - value
    }

    /// The standard normal upper tail `P(Z > x)`.
    static func normalUpperTail(_ x: Double) -> Double { 0.5 * erfc(x * 0.707_106_781_186_547_524_4) }

    /// The standard normal quantile by Acklam's rational approximation (relative error < 1.2e-9).
    static func normalQuantile(_ p: Double) -> Double {
        precondition(p > 0 && p < 1, "normalQuantile needs p in (0, 1), got \(p)")
        let a = [-3.969_683_028_665_376e+01, 2.209_460_984_245_205e+02, -2.759_285_104_469_687e+02,
                 1.383_577_518_672_690e+02, -3.066_479_806_614_716e+01, 2.506_628_277_459_239e+00]
        let b = [-5.447_609_879_822_406e+01, 1.615_858_368_580_409e+02, -1.556_989_798_598_866e+02,
                 6.680_131_188_771_972e+01, -1.328_068_155_288_572e+01]
        let c = [-7.784_894_002_430_293e-03, -3.223_964_580_411_365e-01, -2.400_758_277_161_838e+00,
                 -2.549_732_539_343_734e+00, 4.374_664_141_464_968e+00, 2.938_163_982_698_783e+00]
        let d = [7.784_695_709_041_462e-03, 3.224_671_290_700_398e-01, 2.445_134_137_142_996e+00,
                 3.754_408_661_907_416e+00]
        func tail(_ q: Double) -> Double {
            (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
                / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
        }
        let low = 0.024_25
        if p < low { return tail((-2 * log(p)).squareRoot()) }
        if p > 1 - low { return -tail((-2 * log(1 - p)).squareRoot()) }
        let q = p - 0.5
        let r = q * q
        return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    }
}

/// `P(Z > x)` by linear interpolation in a table, for the calibration's inner loops (thousands of
/// evaluations per row). Absolute error below 1e-6.
enum NormalTailTable {
    private static let limit = 8.0
    private static let stepsPerUnit = 256.0
    private static let values: [Double] = {
        let count = Int(2 * limit * stepsPerUnit) + 2
        return (0..<count).map { DeterministicMath.normalUpperTail(Double($0) / stepsPerUnit - limit) }
    }()

    @inline(__always)
    static func upperTail(_ x: Double) -> Double {
        if x <= -limit { return 1 }
        if x >= limit { return 0 }
        let position = (x + limit) * stepsPerUnit
        let index = Int(position)
        let fraction = position - Double(index)
        return values.withUnsafeBufferPointer { table in
            table[index] + fraction * (table[index + 1] - table[index])
        }
    }
}

/// Sixteen-lane Float versions of the two functions Box–Muller needs, after Cephes' `logf` and
/// `sinf`/`cosf`, with the same bits on every AVX2 machine. Lane selection and int↔float
/// conversion are done with bit operations: the generic SIMD `replacing(with:where:)` and
/// conversions run lane by lane.
enum VectorMath {
    /// `Float(v)` for integers `v` in 0..<2²³, through the exponent of 2²³.
    @inline(__always)
    static func exactFloat(_ v: SIMD16<UInt32>) -> SIMD16<Float> {
        unsafeBitCast(v | 0x4B00_0000, to: SIMD16<Float>.self) - 8_388_608
    }

    /// Uniform floats in [0, 1) from the top 23 bits of each word.
    @inline(__always)
    static func unitInterval(_ bits: SIMD16<UInt32>) -> SIMD16<Float> {
        unsafeBitCast((bits &>> 9) | 0x3F80_0000, to: SIMD16<Float>.self) - 1
    }

    /// Square root of non-negative inputs below 2¹²⁶: a bit-trick estimate and three Newton steps
    /// (relative error ≈ 1e-7). The SIMD `squareRoot()` runs lane by lane through `sqrtf`, which
    /// keeps the whole Box–Muller block from vectorising.
    @inline(__always)
    static func squareRoot(_ x: SIMD16<Float>) -> SIMD16<Float> {
        let v = x + 1e-30  // keeps 0 away from the division; no effect on normal inputs
        var y = unsafeBitCast((unsafeBitCast(v, to: SIMD16<UInt32>.self) &>> 1) &+ 0x1FBD_1DF5, to: SIMD16<Float>.self)
        y = 0.5 * (y + v / y)
        y = 0.5 * (y + v / y)
        y = 0.5 * (y + v / y)
        return y
    }

    /// Natural log for positive normal inputs (relative error ≈ 1e-7). The mantissa is reduced
    /// to [√½, √2) by moving the exponent break with an integer add.
    @inline(__always)
    static func log(_ x: SIMD16<Float>) -> SIMD16<Float> {
        let bits = unsafeBitCast(x, to: SIMD16<UInt32>.self) &+ (0x3F80_0000 - 0x3F35_04F3)
        let exponent = exactFloat(bits &>> 23) - 127
        let m = unsafeBitCast((bits & 0x007F_FFFF) &+ 0x3F35_04F3, to: SIMD16<Float>.self) - 1
        let z = m * m
        var y = SIMD16<Float>(repeating: 7.037_683_629_2e-2)
        y = y * m - 1.151_461_031_0e-1
        y = y * m + 1.167_699_874_0e-1
        y = y * m - 1.242_014_084_6e-1
        y = y * m + 1.424_932_278_7e-1
        y = y * m - 1.666_805_766_5e-1
        y = y * m + 2.000_071_476_5e-1
        y = y * m - 2.499_999_399_3e-1
        y = y * m + 3.333_333_117_4e-1
        y = y * m * z
        y += exponent * -2.121_944_40e-4
        y -= 0.5 * z
        return m + y + exponent * 0.693_359_375
    }

    /// `(sin 2πu, cos 2πu)` for u in [0, 1): reduce to a quarter turn, evaluate on ±π/4, rotate back.
    @inline(__always)
    static func sinCosTwoPi(_ u: SIMD16<Float>) -> (SIMD16<Float>, SIMD16<Float>) {
        let t = u * 4
        // Adding 1.5·2²³ rounds t to the nearest integer and leaves it in the low mantissa bits.
        let magic = SIMD16<Float>(repeating: 12_582_912)
        let shifted = t + magic
        let quadrant = unsafeBitCast(shifted, to: SIMD16<UInt32>.self) & 3
        let a = (t - (shifted - magic)) * (Float.pi / 2)
        let z = a * a
        var s = SIMD16<Float>(repeating: -1.951_529_589_1e-4)
        s = s * z + 8.332_160_873_6e-3
        s = s * z - 1.666_665_461_1e-1
        s = s * z * a + a
        var c = SIMD16<Float>(repeating: 2.443_315_711_809_948e-5)
        c = c * z - 1.388_731_625_493_765e-3
        c = c * z + 4.166_664_568_298_827e-2
        c = c * z * z - 0.5 * z + 1
        // Odd quadrants swap sine and cosine; quadrants 2, 3 negate the sine; 1, 2 the cosine.
        let swap = SIMD16<UInt32>(repeating: 0) &- (quadrant & 1)
        let sBits = unsafeBitCast(s, to: SIMD16<UInt32>.self)
        let cBits = unsafeBitCast(c, to: SIMD16<UInt32>.self)
        let sine = ((sBits & ~swap) | (cBits & swap)) ^ ((quadrant & 2) &<< 30)
        let cosine = ((cBits & ~swap) | (sBits & swap)) ^ (((quadrant &+ 1) & 2) &<< 30)
        return (unsafeBitCast(sine, to: SIMD16<Float>.self), unsafeBitCast(cosine, to: SIMD16<Float>.self))
    }
}

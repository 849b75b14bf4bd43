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
        for c in [
            -0.822_152_23, 1.488_515_87, -1.135_203_98, 0.278_868_07, -0.186_288_06, 0.096_784_18,
            0.374_091_96, 1.000_023_68, -1.265_512_23,
        ] {
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
        let a = [
            -3.969_683_028_665_376e+01, 2.209_460_984_245_205e+02, -2.759_285_104_469_687e+02,
            1.383_577_518_672_690e+02, -3.066_479_806_614_716e+01, 2.506_628_277_459_239e+00,
        ]
        let b = [
            -5.447_609_879_822_406e+01, 1.615_858_368_580_409e+02, -1.556_989_798_598_866e+02,
            6.680_131_188_771_972e+01, -1.328_068_155_288_572e+01,
        ]
        let c = [
            -7.784_894_002_430_293e-03, -3.223_964_580_411_365e-01, -2.400_758_277_161_838e+00,
            -2.549_732_539_343_734e+00, 4.374_664_141_464_968e+00, 2.938_163_982_698_783e+00,
        ]
        let d = [
            7.784_695_709_041_462e-03, 3.224_671_290_700_398e-01, 2.445_134_137_142_996e+00,
            3.754_408_661_907_416e+00,
        ]
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
    /// The tail at every grid point; hot loops take it once (`upperTail(_:in:)`), since every read of
    /// a global goes through its lazy initialisation check.
    static let values: [Double] = {
        let count = Int(2 * limit * stepsPerUnit) + 2
        return (0..<count).map { DeterministicMath.normalUpperTail(Double($0) / stepsPerUnit - limit) }
    }()

    @inline(__always)
    static func upperTail(_ x: Double) -> Double {
        values.withUnsafeBufferPointer { upperTail(x, in: $0) }
    }

    /// The same, interpolated in `table` (`values`).
    @inline(__always)
    static func upperTail(_ x: Double, in table: UnsafeBufferPointer<Double>) -> Double {
        if x <= -limit { return 1 }
        if x >= limit { return 0 }
        let position = (x + limit) * stepsPerUnit
        let index = Int(position)
        let fraction = position - Double(index)
        return table[index] + fraction * (table[index + 1] - table[index])
    }
}

import KVKernels

/// The hot loops: dot products, a vectorised exp, softmax, and decode attention. Everything works on
/// contiguous rows through unsafe pointers and SIMD16, allocates nothing, and widens Float16 storage
/// to Float32 sixteen lanes at a time.
public enum Kernels {
    @inline(__always)
    static func load16(_ pointer: UnsafePointer<Float>) -> SIMD16<Float> {
        UnsafeRawPointer(pointer).loadUnaligned(as: SIMD16<Float>.self)
    }

    /// `q · k` over `count` elements, `q` in Float32 and `k` in any storage type.
    @inline(__always)
    public static func dot<S: KVScalar>(_ q: UnsafePointer<Float>, _ k: UnsafePointer<S>, count: Int) -> Float {
        var a0 = SIMD16<Float>()
        var a1 = SIMD16<Float>()
        var i = 0
        while i + 32 <= count {
            a0 += load16(q + i) * S.load16(k + i)
            a1 += load16(q + i + 16) * S.load16(k + i + 16)
            i += 32
        }
        if i + 16 <= count {
            a0 += load16(q + i) * S.load16(k + i)
            i += 16
        }
        var sum = horizontalSum(a0 + a1)
        while i < count {
            sum += q[i] * Float(k[i])
            i += 1
        }
        return sum
    }

    /// The sum of 16 lanes as a tree of halving adds; `SIMD16.sum()` adds lane by lane in order,
    /// a 16-deep dependency chain that dominated the per-row cost.
    @inline(__always)
    public static func horizontalSum(_ v: SIMD16<Float>) -> Float {
        let v8 = v.lowHalf + v.highHalf
        let v4 = v8.lowHalf + v8.highHalf
        let v2 = v4.lowHalf + v4.highHalf
        return v2[0] + v2[1]
    }

    /// The larger of each pair of lanes, as one compare and blend: the standard library's
    /// `pointwiseMax` compiles to sixteen scalar steps through the stack.
    @inline(__always)
    public static func lanewiseMax(_ a: SIMD16<Float>, _ b: SIMD16<Float>) -> SIMD16<Float> {
        a.replacing(with: b, where: b .> a)
    }

    /// `e^x` lane by lane (Cephes' single-precision range reduction and polynomial, relative error
    /// below 2e-7 for x in [-87, 88]); inputs below -87 give 0 so that masked scores vanish.
    @inline(__always)
    public static func exp(_ x: SIMD16<Float>) -> SIMD16<Float> {
        // Adding 1.5·2^23 rounds to an integer held in the low mantissa bits: the same value as a
        // float and as bits, without the stdlib's lane-by-lane `rounded` and Float → Int32 paths.
        let magic: Float = 12_582_912
        let tooSmall = x .< -87.0
        var x = x.replacing(with: 88.3, where: x .> 88.3).replacing(with: -87.0, where: tooSmall)
        let shifted = x * 1.442_695_04 + magic
        let n = shifted - magic
        x -= n * 0.693_359_375
        x -= n * -2.121_944_4e-4
        var y = SIMD16<Float>(repeating: 1.987_569_15e-4)
        y = y * x + 1.398_199_95e-3
        y = y * x + 8.333_451_9e-3
        y = y * x + 4.166_579_59e-2
        y = y * x + 1.666_666_55e-1
        y = y * x + 5.000_000_12e-1
        y = y * (x * x) + x + 1
        let integral = unsafeBitCast(shifted, to: SIMD16<Int32>.self) &- 0x4B40_0000
        let scale = unsafeBitCast((integral &+ 127) &<< 23, to: SIMD16<Float>.self)
        return (y * scale).replacing(with: 0, where: tooSmall)
    }

    /// Scalar `e^x` through the vector path, for the odd tail element.
    @inline(__always)
    public static func exp(_ x: Float) -> Float { exp(SIMD16(repeating: x))[0] }

    /// Turns `count` logits into probabilities in place; returns the largest logit.
    @discardableResult
    public static func softmax(_ s: UnsafeMutablePointer<Float>, count: Int) -> Float {
        var maxV = SIMD16<Float>(repeating: -.infinity)
        var i = 0
        while i + 16 <= count {
            maxV = lanewiseMax(maxV, load16(s + i))
            i += 16
        }
        var maxLogit = maxV.max()
        while i < count {
            maxLogit = Swift.max(maxLogit, s[i])
            i += 1
        }
        var sumV = SIMD16<Float>()
        var sum: Float = 0
        i = 0
        while i + 16 <= count {
            let e = exp(load16(s + i) - maxLogit)
            UnsafeMutableRawPointer(s + i).storeBytes(of: e, as: SIMD16<Float>.self)
            sumV += e
            i += 16
        }
        while i < count {
            s[i] = exp(s[i] - maxLogit)
            sum += s[i]
            i += 1
        }
        let inv = 1 / (sum + sumV.sum())
        i = 0
        while i + 16 <= count {
            UnsafeMutableRawPointer(s + i).storeBytes(of: load16(s + i) * inv, as: SIMD16<Float>.self)
            i += 16
        }
        while i < count {
            s[i] *= inv
            i += 1
        }
        return maxLogit
    }

    /// Scaled logits `q·k_j/√d` of one query against `rows` consecutive key rows.
    @inline(__always)
    public static func logits<S: KVScalar>(
        query: UnsafePointer<Float>, keys: UnsafePointer<S>, rows: Int, headDim: Int,
        into scores: UnsafeMutablePointer<Float>
    ) {
        let scale = 1 / Float(headDim).squareRoot()
        var j = 0
        var k = keys
        if headDim % 16 == 0 {
            // Four rows at a time: each query chunk is loaded once for four keys, and the four
            // independent accumulators keep the FMA units busy.
            while j + 4 <= rows {
                var a0 = SIMD16<Float>()
                var a1 = SIMD16<Float>()
                var a2 = SIMD16<Float>()
                var a3 = SIMD16<Float>()
                var c = 0
                while c < headDim {
                    let q = load16(query + c)
                    a0 += q * S.load16(k + c)
                    a1 += q * S.load16(k + headDim + c)
                    a2 += q * S.load16(k + 2 * headDim + c)
                    a3 += q * S.load16(k + 3 * headDim + c)
                    c += 16
                }
                scores[j] = horizontalSum(a0) * scale
                scores[j + 1] = horizontalSum(a1) * scale
                scores[j + 2] = horizontalSum(a2) * scale
                scores[j + 3] = horizontalSum(a3) * scale
                k += 4 * headDim
                j += 4
            }
        }
        while j < rows {
            scores[j] = dot(query, k, count: headDim) * scale
            k += headDim
            j += 1
        }
    }

    /// `out = Σ_j p_j · v_j` over `rows` value rows.
    @inline(__always)
    public static func weightedSum<S: KVScalar>(
        probabilities p: UnsafePointer<Float>, values: UnsafePointer<S>, rows: Int, headDim: Int,
        into out: UnsafeMutablePointer<Float>
    ) {
        out.update(repeating: 0, count: headDim)
        var v = values
        for j in 0..<rows {
            let w = p[j]
            var c = 0
            while c + 16 <= headDim {
                let acc = load16(out + c) + w * S.load16(v + c)
                UnsafeMutableRawPointer(out + c).storeBytes(of: acc, as: SIMD16<Float>.self)
                c += 16
            }
            while c < headDim {
                out[c] += w * Float(v[c])
                c += 1
            }
            v += headDim
        }
    }

    /// Decode attention of one query over one head: logits, softmax, weighted sum of values.
    /// `scratch` needs `rows` floats and holds the probabilities afterwards.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func decodeAttention<S: KVScalar>(
        query: UnsafePointer<Float>, keys: UnsafePointer<S>, values: UnsafePointer<S>, rows: Int,
        headDim: Int, scratch: UnsafeMutablePointer<Float>, output: UnsafeMutablePointer<Float>
    ) {
        logits(query: query, keys: keys, rows: rows, headDim: headDim, into: scratch)
        softmax(scratch, count: rows)
        weightedSum(probabilities: scratch, values: values, rows: rows, headDim: headDim, into: output)
    }

    /// Cosine similarity of two Float32 rows, with zero norms guarded by `epsilon`.
    @inline(__always)
    public static func cosine(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) -> Float {
        let ab = dot(a, b, count: count)
        let aa = dot(a, a, count: count)
        let bb = dot(b, b, count: count)
        return ab / Swift.max((aa * bb).squareRoot(), 1e-12)
    }
}

extension Kernels {
    /// The instruction set the compute-bound kernels (`KVKernels`) chose on this CPU: `avx2+fma` or
    /// `portable`.
    public static var computePath: String { String(cString: kvk_path()) }

    /// Runs a register-only loop of fused multiply-adds at the score kernel's vector width; returns a
    /// value that depends on every operation.
    public static func fmaLoop(iterations: Int) -> Float { kvk_fma_loop(iterations) }

    /// Floating-point operations `fmaLoop(iterations:)` performs.
    public static func fmaLoopFlops(iterations: Int) -> Double { kvk_fma_loop_flops(iterations) }
}

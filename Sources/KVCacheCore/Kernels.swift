import Dispatch
import KVKernels

/// The hot loops: dot products, a vectorised exp and softmax in Swift (SIMD16 over contiguous rows,
/// nothing allocated per element), and decode attention, whose memory-bound passes over the cached
/// rows run in the C kernels (`KVKernels`) with the softmax between them here.
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
        logits(queries: query, groups: 1, keys: keys, rows: rows, headDim: headDim, into: scores, stride: rows)
    }

    /// Scaled logits of `groups` queries (back to back) against `rows` key rows, query `g`'s at
    /// `scores + g * stride`: a GQA group reads its KV head once (`kvk_decode_logits`).
    @inline(__always)
    public static func logits<S: KVScalar>(
        queries: UnsafePointer<Float>, groups: Int, keys: UnsafePointer<S>, rows: Int, headDim: Int,
        into scores: UnsafeMutablePointer<Float>, stride: Int
    ) {
        kvk_decode_logits(
            queries, groups, keys, S.isHalf, rows, headDim, 1 / Float(headDim).squareRoot(), scores, stride)
    }

    /// `out = Σ_j p_j · v_j` over `rows` value rows.
    @inline(__always)
    public static func weightedSum<S: KVScalar>(
        probabilities p: UnsafePointer<Float>, values: UnsafePointer<S>, rows: Int, headDim: Int,
        into out: UnsafeMutablePointer<Float>
    ) {
        kvk_decode_weighted_sum(p, 1, rows, values, S.isHalf, rows, headDim, out)
    }

    /// Decode attention of a GQA group's `groups` queries (back to back) over one KV head: logits,
    /// softmax, weighted sum of values. `scratch` needs `groups × rows` floats and holds query `g`'s
    /// probabilities at `g × rows` afterwards; `output` gets `groups × headDim` floats.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func decodeAttention<S: KVScalar>(
        queries: UnsafePointer<Float>, groups: Int = 1, keys: UnsafePointer<S>, values: UnsafePointer<S>, rows: Int,
        headDim: Int, scratch: UnsafeMutablePointer<Float>, output: UnsafeMutablePointer<Float>
    ) {
        logits(queries: queries, groups: groups, keys: keys, rows: rows, headDim: headDim, into: scratch, stride: rows)
        for g in 0..<groups { softmax(scratch + g * rows, count: rows) }
        kvk_decode_weighted_sum(scratch, groups, rows, values, S.isHalf, rows, headDim, output)
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

extension Kernels {
    /// Runs `body(worker, workers)` for every worker in `0..<workers` (at least one), on that many
    /// threads at once, or inline for one: how a layer's heads are split across cores.
    static func forEachWorker(_ workers: Int, _ body: @Sendable (_ worker: Int, _ workers: Int) -> Void) {
        let workers = max(1, workers)
        if workers == 1 {
            body(0, 1)
        } else {
            DispatchQueue.concurrentPerform(iterations: workers) { body($0, workers) }
        }
    }

    /// A buffer that several workers write at once, each to its own range.
    struct SharedOutput<T>: @unchecked Sendable {
        // SAFETY: every worker writes a range no other worker touches, and the owner keeps the
        // buffer alive until `forEachWorker` returns.
        let pointer: UnsafeMutablePointer<T>
        init(_ pointer: UnsafeMutablePointer<T>) { self.pointer = pointer }
    }
}

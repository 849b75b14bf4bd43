import KVKernels

/// The hot loops' Swift entry points. The passes that decide speed (scores, softmax, decode attention,
/// column sums, half-precision narrowing) are C kernels (`KVKernels`) that choose AVX2/FMA/F16C or a
/// portable path at run time and give the same bits on both; a few small row helpers stay here.
public enum Kernels {
    @inline(__always)
    static func load16(_ pointer: UnsafePointer<Float>) -> SIMD16<Float> {
        UnsafeRawPointer(pointer).loadUnaligned(as: SIMD16<Float>.self)
    }

    /// `q · k` over `count` elements.
    @inline(__always)
    public static func dot(_ q: UnsafePointer<Float>, _ k: UnsafePointer<Float>, count: Int) -> Float {
        var a0 = SIMD16<Float>()
        var a1 = SIMD16<Float>()
        var i = 0
        while i + 32 <= count {
            a0 += load16(q + i) * load16(k + i)
            a1 += load16(q + i + 16) * load16(k + i + 16)
            i += 32
        }
        if i + 16 <= count {
            a0 += load16(q + i) * load16(k + i)
            i += 16
        }
        var sum = horizontalSum(a0 + a1)
        while i < count {
            sum += q[i] * k[i]
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

    /// Turns `count` logits into probabilities in place; returns the largest logit (`kvk_softmax`:
    /// Cephes' e^x, every operation rounded on its own, the same bits on every path).
    @discardableResult
    @inline(__always)
    public static func softmax(_ s: UnsafeMutablePointer<Float>, count: Int) -> Float { kvk_softmax(s, count) }

    /// Scaled logits `q·k_j/√d` of one query against `rows` consecutive key rows.
    @inline(__always)
    public static func logits<S: KVScalar>(
        query: UnsafePointer<Float>,
        keys: UnsafePointer<S>,
        rows: Int,
        headDim: Int,
        into scores: UnsafeMutablePointer<Float>
    ) {
        logits(queries: query, groups: 1, keys: keys, rows: rows, headDim: headDim, into: scores, stride: rows)
    }

    /// Scaled logits of `groups` queries (back to back) against `rows` key rows, query `g`'s at
    /// `scores + g * stride`: a GQA group reads its KV head once (`kvk_decode_logits`).
    @inline(__always)
    public static func logits<S: KVScalar>(
        queries: UnsafePointer<Float>,
        groups: Int,
        keys: UnsafePointer<S>,
        rows: Int,
        headDim: Int,
        into scores: UnsafeMutablePointer<Float>,
        stride: Int
    ) {
        kvk_decode_logits(
            queries,
            groups,
            keys,
            S.isHalf,
            rows,
            headDim,
            1 / Float(headDim).squareRoot(),
            scores,
            stride
        )
    }

    /// `out = Σ_j p_j · v_j` over `rows` value rows, for `groups` probability rows (`rows` apart) into
    /// `groups × headDim` outputs: a GQA group reads the values once (`kvk_decode_weighted_sum`).
    @inline(__always)
    public static func weightedSum<S: KVScalar>(
        probabilities p: UnsafePointer<Float>,
        groups: Int = 1,
        values: UnsafePointer<S>,
        rows: Int,
        headDim: Int,
        into out: UnsafeMutablePointer<Float>
    ) {
        kvk_decode_weighted_sum(p, groups, rows, values, S.isHalf, rows, headDim, out)
    }

    /// Decode attention of a GQA group's `groups` queries (back to back) over one KV head: logits,
    /// softmax, weighted sum of values. `scratch` needs `groups × rows` floats and holds query `g`'s
    /// probabilities at `g × rows` afterwards; `output` gets `groups × headDim` floats.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func decodeAttention<S: KVScalar>(
        queries: UnsafePointer<Float>,
        groups: Int = 1,
        keys: UnsafePointer<S>,
        values: UnsafePointer<S>,
        rows: Int,
        headDim: Int,
        scratch: UnsafeMutablePointer<Float>,
        output: UnsafeMutablePointer<Float>
    ) {
        logits(queries: queries, groups: groups, keys: keys, rows: rows, headDim: headDim, into: scratch, stride: rows)
        for g in 0..<groups { softmax(scratch + g * rows, count: rows) }
        weightedSum(probabilities: scratch, groups: groups, values: values, rows: rows, headDim: headDim, into: output)
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
    /// A buffer that several workers write at once, each to its own range.
    struct SharedOutput<T>: @unchecked Sendable {
        // SAFETY: every worker writes a range no other worker touches, and the owner keeps the
        // buffer alive until `forEachWorker` returns.
        let pointer: UnsafeMutablePointer<T>
        init(_ pointer: UnsafeMutablePointer<T>) { self.pointer = pointer }
    }
}

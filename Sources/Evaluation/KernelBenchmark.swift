import Dispatch
public import KVCacheCore
public import Workloads

/// Measures the decode-attention kernel against the machine's own memory read bandwidth, on one core.
public enum KernelBenchmark {
    public struct Figures: Sendable, Codable {
        /// GB/s of a SIMD read-only sum over a DRAM-sized array (best of the runs).
        public var readBandwidth: Double
        /// GB/s of K/V bytes read by decode attention over many 32k-token heads, per storage type.
        public var decode: [String: Double]
    }

    /// Read bandwidth: the fastest of `runs` passes of a 16-lane sum over `bytes` of Float32.
    public static func readBandwidth(bytes: Int = 1 << 30, runs: Int = 5) -> Double {
        let count = bytes / MemoryLayout<Float>.size
        let data = [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            for i in 0..<count { buffer[i] = Float(i & 1023) * 1e-3 }
            initialized = count
        }
        var best = Double.infinity
        var sink: Float = 0
        for _ in 0..<runs {
            let clock = ContinuousClock()
            let start = clock.now
            data.withUnsafeBufferPointer { buffer in
                let base = UnsafeRawPointer(buffer.baseAddress!)
                var a0 = SIMD16<Float>()
                var a1 = SIMD16<Float>()
                var a2 = SIMD16<Float>()
                var a3 = SIMD16<Float>()
                var i = 0
                let stride = 16 * MemoryLayout<Float>.size
                while i + 4 * stride <= bytes {
                    a0 += base.loadUnaligned(fromByteOffset: i, as: SIMD16<Float>.self)
                    a1 += base.loadUnaligned(fromByteOffset: i + stride, as: SIMD16<Float>.self)
                    a2 += base.loadUnaligned(fromByteOffset: i + 2 * stride, as: SIMD16<Float>.self)
                    a3 += base.loadUnaligned(fromByteOffset: i + 3 * stride, as: SIMD16<Float>.self)
                    i += 4 * stride
                }
                sink += (a0 + a1 + a2 + a3).sum()
            }
            best = min(best, (clock.now - start).seconds)
        }
        blackHole(sink)
        return Double(bytes) / best / 1e9
    }

    /// The GQA group `bench-kernels` also measures: 32 query heads over 8 KV heads.
    public static let gqaGroup = 4

    /// Decode attention of `groups` queries per head (a GQA group) over `heads` heads of `tokens`
    /// rows each (together far larger than the caches, so every pass streams from memory); GB/s of K
    /// and V bytes read.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func decodeThroughput<S: KVScalar>(
        _: S.Type,
        groups: Int = 1,
        tokens: Int = 32_768,
        headDim: Int = 128,
        totalBytes: Int = 1 << 30,
        runs: Int = 3
    ) -> Double {
        let bytesPerHead = 2 * tokens * headDim * MemoryLayout<S>.size
        let heads = max(2, totalBytes / bytesPerHead)
        let rows = (0..<(tokens * headDim)).map { S(Float(($0 * 7919) % 1000) * 1e-3 - 0.5) }
        let keys = (0..<heads).map { h in rows.map { $0 + S(Float(h) * 1e-3) } }
        // Values in storage of their own, as in a cache: sharing the keys' would let the value pass
        // read from the last-level cache what the key pass just brought in.
        let values = (0..<heads).map { h in rows.map { $0 - S(Float(h) * 1e-3) } }
        let queries = (0..<(groups * headDim)).map { Float(($0 * 31) % 17) * 0.05 - 0.4 }
        var scratch = [Float](repeating: 0, count: groups * tokens)
        var output = [Float](repeating: 0, count: groups * headDim)
        var best = Double.infinity
        var sink: Float = 0
        for _ in 0..<runs {
            let clock = ContinuousClock()
            let start = clock.now
            for h in 0..<heads {
                keys[h].withUnsafeBufferPointer { k in
                    values[h].withUnsafeBufferPointer { v in
                        Kernels.decodeAttention(
                            queries: queries,
                            groups: groups,
                            keys: k.baseAddress!,
                            values: v.baseAddress!,
                            rows: tokens,
                            headDim: headDim,
                            scratch: &scratch,
                            output: &output
                        )
                    }
                }
                sink += output[0]
            }
            best = min(best, (clock.now - start).seconds)
        }
        blackHole(sink)
        return Double(heads * bytesPerHead) / best / 1e9
    }

    /// GB/s of the digest replicas compare (`HeadCache.digest`, which a shard copy computes on both
    /// sides) over one head of `bytes` of keys and values, best of `runs`.
    public static func digestThroughput(bytes: Int = 1 << 30, runs: Int = 3) -> Double {
        let headDim = 128
        let rows = bytes / (2 * headDim * MemoryLayout<Float>.size)
        let keys = (0..<(rows * headDim)).map { Float($0 & 1023) * 1e-3 }
        let head = HeadCache(
            headDim: headDim,
            keys: keys,
            values: keys.reversed(),
            positions: (0..<Int32(rows)).map { $0 },
            tags: [ModalityTag](repeating: ModalityTag(.text), count: rows)
        )!
        var best = Double.infinity
        var sink: UInt64 = 0
        for _ in 0..<runs {
            let clock = ContinuousClock()
            let start = clock.now
            sink ^= head.digest
            best = min(best, (clock.now - start).seconds)
        }
        blackHole(Float(sink & 1))
        return Double(head.payloadBytes) / best / 1e9
    }

    /// Floating-point operations per second of a register-only FMA loop running on `threads` threads
    /// at once, at the score kernel's vector width: the compute peak the profile is measured against.
    public static func fmaPeak(threads: Int, iterations: Int = 100_000_000, runs: Int = 3) -> Double {
        var best = Double.infinity
        for _ in 0..<runs {
            let clock = ContinuousClock()
            let start = clock.now
            DispatchQueue.concurrentPerform(iterations: threads) { _ in
                blackHole(Kernels.fmaLoop(iterations: iterations))
            }
            best = min(best, (clock.now - start).seconds)
        }
        return Double(threads) * Kernels.fmaLoopFlops(iterations: iterations) / best
    }

    /// Floating-point operations per second of the attention profile that observes every prompt row
    /// (H2O's and LOOK-M's) of `prefill` on `threads` threads, best of `runs`; counts only the score
    /// products of the causal triangle, not the softmax or the tiles' skipped corners.
    public static func profileThroughput(
        prefill: LayerPrefill,
        threads: Int,
        runs: Int = 3
    ) throws -> (
        flopsPerSecond: Double, seconds: Double
    ) {
        var best = Double.infinity
        for _ in 0..<runs {
            let clock = ContinuousClock()
            let start = clock.now
            let profile = try AttentionProfile(
                prefill: prefill,
                requirements: ProfileRequirements(suffixStarts: [0]),
                threads: .dispatch(threads)
            )
            best = min(best, (clock.now - start).seconds)
            blackHole(profile.columnSums[0]![0])
        }
        let flops = AttentionProfile.flops(geometry: prefill.geometry, promptLength: prefill.promptLength, firstRow: 0)
        return (flops / best, best)
    }

    /// Seconds to synthesise layer `layer` of `trace` as a worker does (`SequenceTrace.layerTrace`:
    /// keys, values, the query rows from `firstQueryRow` on and the decode steps), on this thread,
    /// best of `runs`, and the floats written. Layers this large are never kept for reuse, so every
    /// run synthesises.
    public static func synthesisTime(
        trace: SequenceTrace,
        layer: Int,
        firstQueryRow: Int,
        runs: Int = 3
    ) -> (seconds: Double, floats: Int) {
        var best = Double.infinity
        var floats = 0
        for _ in 0..<runs {
            let clock = ContinuousClock()
            let start = clock.now
            let synthesised = trace.layerTrace(layer, firstQueryRow: firstQueryRow)
            best = min(best, (clock.now - start).seconds)
            floats = SequenceTrace.floats(in: synthesised)
            blackHole(synthesised.prefill.keys[0][0])
        }
        return (best, floats)
    }

    @inline(never)
    static func blackHole(_ value: Float) {
        if value.isNaN && value.sign == .minus && value.significand == 0 { print(value) }
    }
}

import KVKernels
import Testing

@testable import KVCacheCore

/// The C kernels' promise: the same bits whatever path, grouping or thread count computed them, so
/// replicas agree on any CPU.
@Suite struct KernelPathTests {
    @Test(arguments: [7, 33, 128])
    func scorePathsAgree(headDim d: Int) {
        var rng = SeededGenerator(seed: UInt64(d))
        let keyCount = 45
        let rows = 13
        let keys = rng.floats(keyCount * d)
        let queries = rng.floats(rows * d, scale: 2)
        var packed = [Float](repeating: 0, count: kvk_packed_floats(keyCount, d))
        kvk_pack_keys(keys, d, nil, keyCount, &packed)
        let stride = kvk_packed_floats(keyCount, 1)
        for causalEnd in [0, 20] {
            var best = [Float](repeating: 0, count: rows * stride)
            var portable = best
            kvk_scores(queries, d, rows, packed, keyCount, d, 0.5, causalEnd, &best, stride)
            kvk_scores_portable(queries, d, rows, packed, keyCount, d, 0.5, causalEnd, &portable, stride)
            for i in 0..<rows {
                let needed = causalEnd == 0 ? keyCount : min(keyCount, causalEnd + i)
                for j in 0..<needed {
                    #expect(
                        best[i * stride + j].bitPattern == portable[i * stride + j].bitPattern,
                        "seed \(d) \(i),\(j)"
                    )
                }
            }
        }
    }

    @Test(arguments: [(7, 1), (40, 4), (96, 2), (128, 1), (128, 4), (64, 8)])
    func decodePathsAgree(headDim d: Int, groups: Int) {
        let seed = UInt64(d * 10 + groups)
        var rng = SeededGenerator(seed: seed)
        let rows = 37
        let keys = rng.floats(rows * d)
        let values = rng.floats(rows * d)
        let queries = rng.floats(groups * d, scale: 2)
        let weights = rng.floats(groups * rows).map { abs($0) }
        func check<S: KVScalar>(_ keys: [S], _ values: [S]) {
            var best = [Float](repeating: 0, count: groups * rows)
            var portable = best
            var out = [Float](repeating: 0, count: groups * d)
            var outPortable = out
            keys.withUnsafeBytes { k in
                kvk_decode_logits(queries, groups, k.baseAddress, S.isHalf, rows, d, 0.25, &best, rows)
                kvk_decode_logits_portable(queries, groups, k.baseAddress, S.isHalf, rows, d, 0.25, &portable, rows)
            }
            values.withUnsafeBytes { v in
                kvk_decode_weighted_sum(weights, groups, rows, v.baseAddress, S.isHalf, rows, d, &out)
                kvk_decode_weighted_sum_portable(weights, groups, rows, v.baseAddress, S.isHalf, rows, d, &outPortable)
            }
            #expect(best.map(\.bitPattern) == portable.map(\.bitPattern), "logits \(S.self) seed \(seed)")
            #expect(out.map(\.bitPattern) == outPortable.map(\.bitPattern), "weighted sum \(S.self) seed \(seed)")
        }
        check(keys, values)
        check(keys.map { Float16($0) }, values.map { Float16($0) })
    }

    @Test(arguments: [1, 15, 16, 17, 33, 257, 4099])
    func softmaxPathsAgree(count: Int) {
        var rng = SeededGenerator(seed: UInt64(count))
        for scale: Float in [0.1, 5, 40, 150] {
            var best = rng.floats(count, scale: scale)
            var portable = best
            let top = best.withUnsafeMutableBufferPointer { kvk_softmax($0.baseAddress!, count) }
            let portableTop = portable.withUnsafeMutableBufferPointer { kvk_softmax_portable($0.baseAddress!, count) }
            #expect(top == portableTop)
            #expect(best.map(\.bitPattern) == portable.map(\.bitPattern), "seed \(count) scale \(scale)")
        }
    }

    /// Narrowing to half precision: F16C and the portable rounding agree with Swift's `Float16(_:)` on
    /// every class of input (ties, subnormals, overflow to infinity, signed zeros).
    @Test func halfNarrowingPathsAgree() {
        var rng = SeededGenerator(seed: 11)
        var values = rng.floats(4099, scale: 3)
        values += [0, -0, 65504, 65519, 65520, 1e9, -1e9, 6.0e-8, 2.98e-8, 2.99e-8, 1e-10, -3e-6, .infinity]
        // Around half precision's subnormals.
        values += (0..<2000).map { Float(bitPattern: 0x3380_0000 &+ UInt32($0) &* 0x1_0001) }
        values += (0..<2000).map { Float(bitPattern: 0x3F80_0000 | UInt32($0) << 12 | 0x1000) }  // exact ties
        var best = [UInt16](repeating: 0, count: values.count)
        var portable = best
        kvk_narrow_to_half(values, &best, values.count)
        kvk_narrow_to_half_portable(values, &portable, values.count)
        for i in values.indices {
            let swift = Float16(values[i]).bitPattern
            #expect(best[i] == swift && portable[i] == swift, "value \(values[i]): \(best[i]) \(portable[i]) \(swift)")
        }
    }

    /// Ingest: copying wire bytes (at an odd offset, as inside a frame) with the finiteness check fused
    /// in gives Swift's own conversion on both paths, and both stop at the same first NaN or infinity,
    /// wherever it falls (in an AVX2 block, at a block's edge, in the tail).
    @Test(arguments: [0, 1, 63, 64, 65, 200, 4098])
    func ingestPathsAgree(count: Int) {
        var rng = SeededGenerator(seed: UInt64(1000 + count))
        let floats = rng.floats(count, scale: 70000)
        let halves = floats.map { Float16(max(-65504, min(65504, $0))) }
        func bytes<T>(_ values: [T]) -> [UInt8] { [0x55] + values.withUnsafeBytes { Array($0) } }
        /// The kernel's answer and, when every element was finite, what it copied.
        func copied<T>(
            _ bytes: [UInt8],
            _ kernel: (UnsafeRawPointer, UnsafeMutablePointer<T>, Int) -> Int
        ) -> (Int, [T]) {
            var index = 0
            let values = bytes.withUnsafeBytes { raw in
                [T](unsafeUninitializedCapacity: max(count, 1)) { buffer, initialized in
                    index = kernel(raw.baseAddress! + 1, buffer.baseAddress!, count)
                    initialized = index == count ? count : 0
                }
            }
            return (index, values)
        }
        for poison in [0, count / 2, count - 1].filter({ $0 < count }) + [-1] {
            var f32 = floats
            var f16 = halves
            if poison >= 0 {
                f32[poison] = poison % 2 == 0 ? .nan : -.infinity
                f16[poison] = poison % 2 == 0 ? .infinity : -.nan
            }
            let expected = poison >= 0 ? poison : count
            let (best32, values32) = copied(bytes(f32)) { kvk_load_finite_f32($0, $1, $2) }
            let (portable32, _) = copied(bytes(f32)) { kvk_load_finite_f32_portable($0, $1, $2) }
            let (widen, widened) = copied(bytes(f16)) { kvk_widen_finite_f16($0, $1, $2) }
            let (portableWiden, _) = copied(bytes(f16)) { kvk_widen_finite_f16_portable($0, $1, $2) }
            let (half, kept): (Int, [UInt16]) = copied(bytes(f16)) { kvk_load_finite_f16($0, $1, $2) }
            let (portableHalf, _): (Int, [UInt16]) = copied(bytes(f16)) { kvk_load_finite_f16_portable($0, $1, $2) }
            #expect(
                [best32, portable32, widen, portableWiden, half, portableHalf] == Array(repeating: expected, count: 6),
                "count \(count), poison \(poison)"
            )
            let firstBad = f32.withUnsafeBufferPointer { kvk_first_nonfinite_f32($0.baseAddress, count) }
            #expect(firstBad == expected)
            if poison < 0 {
                #expect(values32.map(\.bitPattern) == f32.map(\.bitPattern))
                #expect(widened.map(\.bitPattern) == f16.map { Float($0).bitPattern })
                #expect(kept == f16.map(\.bitPattern))
            }
        }
    }

    /// Sizes around the 64-byte stripe and the scramble every 16 stripes, at an odd address.
    @Test(arguments: [0, 1, 63, 64, 65, 1023, 1024, 1025, 5000])
    func digestPathsAgree(count: Int) {
        var rng = SeededGenerator(seed: UInt64(count) + 11)
        let bytes = (0..<(count + 1)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        bytes.withUnsafeBytes { raw in
            let start = raw.baseAddress! + 1
            #expect(kvk_digest(7, start, count) == kvk_digest_portable(7, start, count), "\(count) bytes")
        }
    }

    @Test func normalGeneratorPathsAgree() {
        var best = kvk_normal_state()
        withUnsafeMutableBytes(of: &best) { raw in
            for (i, word) in raw.bindMemory(to: UInt64.self).indices.enumerated() {
                raw.storeBytes(of: 0x9E37_79B9_7F4A_7C15 &* UInt64(i + 1), toByteOffset: word * 8, as: UInt64.self)
            }
        }
        var portable = best
        var avx2 = best
        // An odd count: the paths take two blocks per step and the last one alone.
        var a = [Float](repeating: 0, count: 32 * 41)
        var b = a
        var c = a
        kvk_normal_blocks(&best, &a, 41)
        kvk_normal_blocks_portable(&portable, &b, 41)
        kvk_normal_blocks_avx2(&avx2, &c, 41)
        #expect(a.map(\.bitPattern) == b.map(\.bitPattern))
        #expect(c.map(\.bitPattern) == b.map(\.bitPattern))
    }

    /// A GQA group attends in one pass over its KV head; each query gets what it gets alone.
    @Test func groupedAttendEqualsOneQueryAtATime() {
        var rng = SeededGenerator(seed: 21)
        let d = 64
        let groups = 4
        var head = HeadCache<Float16>(headDim: d)
        for position in 0..<50 {
            head.append(key: rng.floats(d), value: rng.floats(d), position: position, tag: .text)
        }
        let queries = rng.floats(groups * d, scale: 2)
        var scratch = [Float](repeating: 0, count: groups * head.count)
        var together = [Float](repeating: 0, count: groups * d)
        head.attend(queries: queries, groups: groups, scratch: &scratch, output: &together)
        for g in 0..<groups {
            var alone = [Float](repeating: 0, count: d)
            Array(queries[(g * d)..<((g + 1) * d)]).withUnsafeBufferPointer { q in
                head.attend(queries: q.baseAddress!, groups: 1, scratch: &scratch, output: &alone)
            }
            #expect(alone.map(\.bitPattern) == together[(g * d)..<((g + 1) * d)].map(\.bitPattern), "query \(g)")
        }
    }

    /// Replicas compare digests and outputs: a decode step must not depend on how many threads ran it.
    @Test func decodeThreadsDoNotChangeTheBits() throws {
        let g = geometry(layers: 1, queryHeads: 8, kvHeads: 4, headDim: 32)
        var rng = SeededGenerator(seed: 5)
        var heads = (0..<g.kvHeads).map { _ in HeadCache<Float>(headDim: g.headDim) }
        for position in 0..<30 {
            for h in heads.indices {
                heads[h].append(
                    key: rng.floats(g.headDim),
                    value: rng.floats(g.headDim),
                    position: position,
                    tag: .text
                )
            }
        }
        let input = try DecodeStepInput(
            geometry: g,
            keys: rng.floats(g.kvHeads * g.headDim),
            values: rng.floats(g.kvHeads * g.headDim),
            queries: rng.floats(g.queryHeads * g.headDim, scale: 2)
        )
        var one = heads
        let expected = LayerDecoder.step(&one, geometry: g, input: input, position: 30, threads: 1)
        for threads in [2, 3, 8] {
            var many = heads
            let got = LayerDecoder.step(&many, geometry: g, input: input, position: 30, threads: .dispatch(threads))
            #expect(got.map(\.bitPattern) == expected.map(\.bitPattern), "threads \(threads)")
        }
    }

    /// A worker attends all its layers of a step in one fork (`LayerDecoder.attend`); each layer's
    /// outputs must be the bits a step of that layer alone gives, whatever the threads.
    @Test func layersAttendedTogetherGiveEachLayersOwnBits() throws {
        let g = geometry(layers: 3, queryHeads: 8, kvHeads: 4, headDim: 32)
        var rng = SeededGenerator(seed: 9)
        // Layers of different lengths, and heads of different lengths within a layer.
        var layers: [[HeadCache<Float>]] = (0..<g.layers).map { l in
            (0..<g.kvHeads).map { h in
                var head = HeadCache<Float>(headDim: g.headDim)
                for position in 0..<(10 + 7 * l + 3 * h) {
                    head.append(
                        key: rng.floats(g.headDim),
                        value: rng.floats(g.headDim),
                        position: position,
                        tag: .text
                    )
                }
                return head
            }
        }
        let inputs = try (0..<g.layers).map { _ in
            try DecodeStepInput(
                geometry: g,
                keys: rng.floats(g.kvHeads * g.headDim),
                values: rng.floats(g.kvHeads * g.headDim),
                queries: rng.floats(g.queryHeads * g.headDim, scale: 2)
            )
        }
        let expected = (0..<g.layers).map { l in
            var alone = layers[l]
            return LayerDecoder.step(&alone, geometry: g, input: inputs[l], position: 100, threads: 1)
        }
        for l in layers.indices { LayerDecoder.append(inputs[l], to: &layers[l], geometry: g, position: 100) }
        for threads in [1, 2, 5] {
            let got = LayerDecoder.attend(
                layers,
                geometry: g,
                queries: inputs.map(\.queries),
                threads: .dispatch(threads)
            )
            #expect(got.map { $0.map(\.bitPattern) } == expected.map { $0.map(\.bitPattern) }, "threads \(threads)")
        }
    }
}

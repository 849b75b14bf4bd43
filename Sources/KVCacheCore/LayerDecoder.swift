/// One decode step over one layer's cache: the new token's rows are appended to every KV head (decoded
/// tokens are never evicted), then every query head attends over its KV head. The worker and the
/// in-process reference both decode through here, so their outputs are bit-identical.
public enum LayerDecoder {
    /// Returns the attention outputs, `queryHeads × headDim` floats, query heads back to back. Each
    /// KV head is read once for its whole GQA group; KV heads are split across `threads` threads in a
    /// fixed pattern, and each head's outputs do not depend on the thread that computed them.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func step<S: KVScalar>(
        _ heads: inout [HeadCache<S>],
        geometry g: ModelGeometry,
        input: DecodeStepInput,
        position: Int,
        threads: ThreadTeam = .single
    ) -> [Float] {
        append(input, to: &heads, geometry: g, position: position)
        return attend([heads], geometry: g, queries: [input.queries], threads: threads)[0]
    }

    /// Attention of every query head over its KV head in each of several layers (rows appended
    /// already), `queries[l]` being layer `l`'s `queryHeads × headDim` queries: the outputs `step`
    /// would return for each, with the same bits. The (layer, KV head) pairs are split across
    /// `threads` in one fixed pattern and one fork: a fork per layer costs about as much as a
    /// compressed layer's attention.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func attend<S: KVScalar>(
        _ layers: [[HeadCache<S>]],
        geometry g: ModelGeometry,
        queries: [[Float]],
        threads: ThreadTeam = .single
    ) -> [[Float]] {
        precondition(queries.count == layers.count, "one query set per layer")
        let perLayer = g.queryHeads * g.headDim
        var outputs = [Float](repeating: 0, count: layers.count * perLayer)
        let rows = layers.joined().map(\.count).max() ?? 0
        let items = layers.count * g.kvHeads
        outputs.withUnsafeMutableBufferPointer { out in
            let target = Kernels.SharedOutput(out.baseAddress!)
            threads.forEachWorker(limit: items) { worker, workers in
                let scratch = UnsafeMutablePointer<Float>.allocate(capacity: g.groupSize * rows)
                defer { scratch.deallocate() }
                for item in stride(from: worker, to: items, by: workers) {
                    let (l, kv) = item.quotientAndRemainder(dividingBy: g.kvHeads)
                    let first = kv * g.groupSize * g.headDim
                    queries[l].withUnsafeBufferPointer { queries in
                        layers[l][kv].attend(
                            queries: queries.baseAddress! + first,
                            groups: g.groupSize,
                            scratch: scratch,
                            output: target.pointer + l * perLayer + first
                        )
                    }
                }
            }
        }
        return (0..<layers.count).map { Array(outputs[($0 * perLayer)..<(($0 + 1) * perLayer)]) }
    }
}

extension LayerDecoder {
    /// Appends one decode step's key and value rows to every KV head, as text at `position`.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func append<S: KVScalar>(
        _ input: DecodeStepInput,
        to heads: inout [HeadCache<S>],
        geometry g: ModelGeometry,
        position: Int
    ) {
        let d = g.headDim
        input.keys.withUnsafeBufferPointer { keys in
            input.values.withUnsafeBufferPointer { values in
                for h in 0..<g.kvHeads {
                    heads[h].append(
                        key: UnsafeBufferPointer(rebasing: keys[(h * d)..<(h * d + d)]),
                        value: UnsafeBufferPointer(rebasing: values[(h * d)..<(h * d + d)]),
                        position: position,
                        tag: .text
                    )
                }
            }
        }
    }
}

extension HeadCache {
    /// Payload bytes by modality bucket.
    public var payloadBytesByModality: ModalityBytes {
        ModalityBytes(tags, rowBytes: 2 * headDim * MemoryLayout<S>.size)
    }
}

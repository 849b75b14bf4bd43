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
        let d = g.headDim
        append(input, to: &heads, geometry: g, position: position)
        var outputs = [Float](repeating: 0, count: g.queryHeads * d)
        let rows = heads.map(\.count).max() ?? 0
        let frozen = heads
        outputs.withUnsafeMutableBufferPointer { out in
            let target = Kernels.SharedOutput(out.baseAddress!)
            threads.forEachWorker(limit: g.kvHeads) { worker, workers in
                let scratch = UnsafeMutablePointer<Float>.allocate(capacity: g.groupSize * rows)
                defer { scratch.deallocate() }
                input.queries.withUnsafeBufferPointer { queries in
                    for kv in stride(from: worker, to: g.kvHeads, by: workers) {
                        let first = kv * g.groupSize * d
                        frozen[kv].attend(
                            queries: queries.baseAddress! + first,
                            groups: g.groupSize,
                            scratch: scratch,
                            output: target.pointer + first
                        )
                    }
                }
            }
        }
        return outputs
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

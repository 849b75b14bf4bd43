/// One decode step over one layer's cache: the new token's rows are appended to every KV head (decoded
/// tokens are never evicted), then every query head attends over its KV head. The worker and the
/// in-process reference both decode through here, so their outputs are bit-identical.
public enum LayerDecoder {
    /// Returns the attention outputs, `queryHeads × headDim` floats, query heads back to back.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func step<S: KVScalar>(
        _ heads: inout [HeadCache<S>], geometry g: ModelGeometry, input: DecodeStepInput, position: Int
    ) -> [Float] {
        let d = g.headDim
        append(input, to: &heads, geometry: g, position: position)
        var outputs = [Float](repeating: 0, count: g.queryHeads * d)
        var scratch = [Float](repeating: 0, count: heads.map(\.count).max() ?? 0)
        input.queries.withUnsafeBufferPointer { queries in
            scratch.withUnsafeMutableBufferPointer { p in
                outputs.withUnsafeMutableBufferPointer { out in
                    for qh in 0..<g.queryHeads {
                        heads[qh / g.groupSize].attend(
                            query: queries.baseAddress! + qh * d, scratch: p.baseAddress!,
                            output: out.baseAddress! + qh * d)
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
        _ input: DecodeStepInput, to heads: inout [HeadCache<S>], geometry g: ModelGeometry, position: Int
    ) {
        let d = g.headDim
        input.keys.withUnsafeBufferPointer { keys in
            input.values.withUnsafeBufferPointer { values in
                for h in 0..<g.kvHeads {
                    heads[h].append(
                        key: UnsafeBufferPointer(rebasing: keys[(h * d)..<(h * d + d)]),
                        value: UnsafeBufferPointer(rebasing: values[(h * d)..<(h * d + d)]), position: position,
                        tag: .text)
                }
            }
        }
    }
}

extension HeadCache {
    /// Payload bytes by modality bucket ("text", "image", "video").
    public var payloadBytesByModality: [String: Int] {
        ModalityTag.bytesByKind(tags, rowBytes: 2 * headDim * MemoryLayout<S>.size)
    }
}

package import KVCacheCore

// Prefill and decode tensors of one layer <-> the core's `LayerPrefill` and `DecodeStepInput`, with
// the shapes `data.proto` documents:
//
// - `LayerDecode`: keys and values `[kvHeads, 1, headDim]`, queries `[queryHeads, 1, headDim]`.
// - `LayerOutput`: `[queryHeads, 1, headDim]`, float32.
// - `LayerTensors`: keys and values `[kvHeads, promptLength, headDim]`, queries
//   `[queryHeads, queryRows, headDim]` with queryRows in 1...promptLength. A tensor cannot have a
//   zero dimension, so a prefill without observation queries (queryRows 0, e.g. for `full` or
//   `streaming-llm`) leaves `queries` unset.
//
// Tensors may be float32 or float16 (widened exactly when read); every element must be finite.
// Error messages start with "layer <n> keys" and the like.

/// The tensor in a message field, or `.badRequest` when the field is unset.
private func requireTensor(
    _ isSet: Bool,
    _ tensor: Tessera_V1_Tensor,
    name: String
) throws(WireError)
    -> Tessera_V1_Tensor
{
    guard isSet else { throw WireError(.badRequest, "\(name) is missing") }
    return tensor
}

/// `parts` back to back as a tensor of `scalarType` (float16 rounds to nearest and must stay in
/// range).
private func makeTensor(
    _ parts: [[Float]],
    shape: [Int],
    scalarType: ScalarType,
    name: String
) throws(WireError)
    -> Tessera_V1_Tensor
{
    switch scalarType {
    case .float32: try Tessera_V1_Tensor(float32Parts: parts, shape: shape, name: name)
    case .float16: try Tessera_V1_Tensor(float16ConvertingParts: parts, shape: shape, name: name)
    }
}

// MARK: - Decode

extension DecodeStepInput {
    /// The new token's K, V and query of one layer as a peer sent them, for a model of `geometry`.
    ///
    /// - Throws: `.badRequest` for a missing tensor; `.invalidShape` for a shape other than
    ///   `[kvHeads, 1, headDim]` (keys, values) or `[queryHeads, 1, headDim]` (queries) or a byte count
    ///   that does not match; `.invalidValue` for an unknown dtype or a non-finite element.
    package init(proto: Tessera_V1_LayerDecode, geometry: ModelGeometry) throws(WireError) {
        let prefix = "layer \(proto.layer)"
        let kvShape = [geometry.kvHeads, 1, geometry.headDim]
        let queryShape = [geometry.queryHeads, 1, geometry.headDim]
        let keys = try requireTensor(proto.hasKeys, proto.keys, name: "\(prefix) keys")
            .floatValues(name: "\(prefix) keys", expectedShape: kvShape)
        let values = try requireTensor(proto.hasValues, proto.values, name: "\(prefix) values")
            .floatValues(name: "\(prefix) values", expectedShape: kvShape)
        let queries = try requireTensor(proto.hasQueries, proto.queries, name: "\(prefix) queries")
            .floatValues(name: "\(prefix) queries", expectedShape: queryShape)
        self = try mapCoreError(field: "\(prefix) decode") { () throws(KVCacheError) in
            try DecodeStepInput(geometry: geometry, keys: keys, values: values, queries: queries)
        }
    }

    /// The step as the `LayerDecode` of `layer`, tensors in `scalarType`.
    ///
    /// - Throws: `.invalidShape` when the arrays do not match `geometry`; `.invalidValue` for a
    ///   negative layer or an element that is not finite (or out of float16 range).
    package func proto(
        layer: Int,
        geometry: ModelGeometry,
        scalarType: ScalarType = .float32
    ) throws(WireError) -> Tessera_V1_LayerDecode {
        let prefix = "layer \(layer)"
        var message = Tessera_V1_LayerDecode()
        message.layer = try wireUInt32(layer, field: "\(prefix) index")
        let kvShape = [geometry.kvHeads, 1, geometry.headDim]
        message.keys = try makeTensor([self.keys], shape: kvShape, scalarType: scalarType, name: "\(prefix) keys")
        message.values = try makeTensor([self.values], shape: kvShape, scalarType: scalarType, name: "\(prefix) values")
        message.queries = try makeTensor(
            [self.queries],
            shape: [geometry.queryHeads, 1, geometry.headDim],
            scalarType: scalarType,
            name: "\(prefix) queries"
        )
        return message
    }
}

extension Tessera_V1_LayerOutput {
    /// The attention output of `layer`: `output` holds queryHeads × headDim floats, heads back to
    /// back, sent as a float32 tensor `[queryHeads, 1, headDim]`.
    ///
    /// - Throws: `.invalidShape` for a wrong element count; `.invalidValue` for a negative layer or a
    ///   non-finite element.
    package init(layer: Int, output: [Float], geometry: ModelGeometry) throws(WireError) {
        self.init()
        self.layer = try wireUInt32(layer, field: "layer \(layer) index")
        self.output = try Tessera_V1_Tensor(
            float32: output,
            shape: [geometry.queryHeads, 1, geometry.headDim],
            name: "layer \(layer) output"
        )
    }

    /// The output's queryHeads × headDim floats, checked against `geometry`.
    ///
    /// - Throws: `.badRequest` when unset; `.invalidShape` for a shape other than
    ///   `[queryHeads, 1, headDim]`; `.invalidValue` for a dtype other than float32 or a non-finite
    ///   element.
    package func outputValues(geometry: ModelGeometry) throws(WireError) -> [Float] {
        let name = "layer \(self.layer) output"
        let tensor = try requireTensor(self.hasOutput, self.output, name: name)
        let shape = [geometry.queryHeads, 1, geometry.headDim]
        let (scalarType, _) = try tensor.validatedLayout(name: name, expectedShape: shape)
        guard scalarType == .float32 else {
            throw WireError(.invalidValue, "\(name): dtype must be float32, got \(scalarType)")
        }
        return try tensor.floatValues(name: name, expectedShape: shape)
    }
}

// MARK: - Prefill

extension LayerPrefill {
    /// One layer's prefill tensors as a peer sent them inline, for a prompt of `promptLength`
    /// positions of a model of `geometry`. Unset `queries` mean no observation rows. Each KV head's
    /// arrays get room for `spareRows` decoded rows (`LayerPrefill.headArray`).
    ///
    /// - Throws: `.badRequest` for missing keys or values; `.invalidShape` for keys or values other
    ///   than `[kvHeads, promptLength, headDim]`, queries other than `[queryHeads, rows, headDim]` with
    ///   rows in 1...promptLength, or a byte count that does not match; `.invalidValue` for an unknown
    ///   dtype or a non-finite element.
    package init(
        proto: Tessera_V1_LayerTensors,
        geometry: ModelGeometry,
        promptLength: Int,
        spareRows: Int = 0
    ) throws(WireError) {
        let prefix = "layer \(proto.layer)"
        guard promptLength >= 1 else {
            throw WireError(.invalidShape, "\(prefix): promptLength must be at least 1, got \(promptLength)")
        }
        let kvShape = [geometry.kvHeads, promptLength, geometry.headDim]
        let spare = max(0, spareRows) * geometry.headDim
        let keys = try requireTensor(proto.hasKeys, proto.keys, name: "\(prefix) keys")
            .floatValuesByFirstDimension(name: "\(prefix) keys", expectedShape: kvShape, spare: spare)
        let values = try requireTensor(proto.hasValues, proto.values, name: "\(prefix) values")
            .floatValuesByFirstDimension(name: "\(prefix) values", expectedShape: kvShape, spare: spare)
        var queries: [Float] = []
        var queryRows = 0
        if proto.hasQueries {
            let name = "\(prefix) queries"
            let (_, shape) = try proto.queries.validatedLayout(name: name)
            guard shape.count == 3, shape[0] == geometry.queryHeads, shape[2] == geometry.headDim,
                (1...promptLength).contains(shape[1])
            else {
                throw WireError(
                    .invalidShape,
                    "\(name): expected shape [\(geometry.queryHeads), rows, \(geometry.headDim)] with rows in "
                        + "1...\(promptLength), got \(shape)"
                )
            }
            queries = try proto.queries.floatValues(name: name, expectedShape: shape)
            queryRows = shape[1]
        }
        self = try mapCoreError(field: "\(prefix) prefill") { () throws(KVCacheError) in
            try LayerPrefill(
                geometry: geometry,
                promptLength: promptLength,
                keys: keys,
                values: values,
                queries: queries,
                queryRows: queryRows,
                checkedFinite: true
            )
        }
    }

    /// The tensors as the inline `LayerTensors` of `layer`: keys and values in `scalarType`,
    /// queries in `queryScalarType` (left unset when `queryRows` is 0).
    ///
    /// - Throws: `.invalidValue` for a negative layer or an element that is not finite (or out of
    ///   float16 range); `.invalidShape` for a dimension above `UInt32.max`.
    package func proto(
        layer: Int,
        scalarType: ScalarType = .float32,
        queryScalarType: ScalarType = .float32
    ) throws(WireError) -> Tessera_V1_LayerTensors {
        let prefix = "layer \(layer)"
        let g = self.geometry
        var message = Tessera_V1_LayerTensors()
        message.layer = try wireUInt32(layer, field: "\(prefix) index")
        let kvShape = [g.kvHeads, self.promptLength, g.headDim]
        message.keys = try makeTensor(
            self.keys,
            shape: kvShape,
            scalarType: scalarType,
            name: "\(prefix) keys"
        )
        message.values = try makeTensor(
            self.values,
            shape: kvShape,
            scalarType: scalarType,
            name: "\(prefix) values"
        )
        if self.queryRows > 0 {
            message.queries = try makeTensor(
                [self.queries],
                shape: [g.queryHeads, self.queryRows, g.headDim],
                scalarType: queryScalarType,
                name: "\(prefix) queries"
            )
        }
        return message
    }
}

import ClusterWire
import KVCacheCore
import SwiftProtobuf
import Testing

/// `tensor` with element `flatIndex` replaced by `value` (float32 only), around the encoder's check,
/// as a misbehaving peer would send it.
private func poisoned(_ tensor: Tessera_V1_Tensor, at flatIndex: Int, with value: Float = .nan) -> Tessera_V1_Tensor {
    var tensor = tensor
    let bits = value.bitPattern
    tensor.data.replaceSubrange(
        (flatIndex * 4)..<(flatIndex * 4 + 4),
        with: [UInt8(bits & 0xFF), UInt8(bits >> 8 & 0xFF), UInt8(bits >> 16 & 0xFF), UInt8(bits >> 24)]
    )
    return tensor
}

@Suite("Prefill and decode tensors <-> proto")
struct LayerTensorConversionTests {
    static let geometry = ModelGeometry.tiny  // 4 query heads, 2 KV heads, headDim 32

    private func step(_ random: inout SeededGenerator) throws -> DecodeStepInput {
        let g = Self.geometry
        return try DecodeStepInput(
            geometry: g,
            keys: random.floats(g.kvHeads * g.headDim),
            values: random.floats(g.kvHeads * g.headDim),
            queries: random.floats(g.queryHeads * g.headDim)
        )
    }

    // MARK: Decode

    @Test("a decode step round-trips bit-exactly in float32, with the documented shapes")
    func decodeRoundTrip() throws {
        var random = SeededGenerator.fromEnvironment()
        let input = try step(&random)
        let message = try input.proto(layer: 3, geometry: Self.geometry)
        #expect(message.layer == 3)
        #expect(message.keys.shape == [2, 1, 32])
        #expect(message.values.shape == [2, 1, 32])
        #expect(message.queries.shape == [4, 1, 32])
        #expect(message.keys.dtype == .float32)
        let bytes: [UInt8] = try message.serializedBytes()
        let decoded = try DecodeStepInput(
            proto: try Tessera_V1_LayerDecode(serializedBytes: bytes),
            geometry: Self.geometry
        )
        #expect(decoded.keys.map(\.bitPattern) == input.keys.map(\.bitPattern), "\(random.replay)")
        #expect(decoded.values.map(\.bitPattern) == input.values.map(\.bitPattern), "\(random.replay)")
        #expect(decoded.queries.map(\.bitPattern) == input.queries.map(\.bitPattern), "\(random.replay)")
    }

    @Test("a float16 decode step widens to the rounded values")
    func decodeFloat16() throws {
        var random = SeededGenerator.fromEnvironment()
        let input = try step(&random)
        let message = try input.proto(layer: 0, geometry: Self.geometry, scalarType: .float16)
        #expect(message.queries.dtype == .float16)
        let decoded = try DecodeStepInput(proto: message, geometry: Self.geometry)
        #expect(decoded.queries == input.queries.map { Float(Float16($0)) }, "\(random.replay)")
    }

    @Test("a wrong decode shape is .invalidShape naming the tensor")
    func decodeWrongShape() throws {
        var random = SeededGenerator.fromEnvironment()
        var message = try step(&random).proto(layer: 4, geometry: Self.geometry)
        // [kvHeads, headDim] without the token axis: same bytes, other shape.
        message.keys.shape = [2, 32]
        let error = wireError { _ = try DecodeStepInput(proto: message, geometry: Self.geometry) }
        #expect(error?.code == .invalidShape)
        #expect(error?.message == "layer 4 keys: expected shape [2, 1, 32], got [2, 32]", "\(error?.message ?? "")")

        // Query heads swapped for KV heads.
        var queries = try step(&random).proto(layer: 4, geometry: Self.geometry)
        queries.queries = try Tessera_V1_Tensor(float32: random.floats(64), shape: [2, 1, 32])
        let queryError = wireError { _ = try DecodeStepInput(proto: queries, geometry: Self.geometry) }
        #expect(queryError?.code == .invalidShape)
        #expect(queryError?.message == "layer 4 queries: expected shape [4, 1, 32], got [2, 1, 32]")

        // Right shape, short data.
        var short = try step(&random).proto(layer: 4, geometry: Self.geometry)
        short.values.data.removeLast(4)
        #expect(wireError { _ = try DecodeStepInput(proto: short, geometry: Self.geometry) }?.code == .invalidShape)

        // Encoding arrays that do not fit the geometry.
        let other = try ModelGeometry(
            name: "other",
            layers: 2,
            queryHeads: 4,
            kvHeads: 4,
            headDim: 32,
            tokensPerImage: 8
        )
        #expect(wireError { _ = try step(&random).proto(layer: 0, geometry: other) }?.code == .invalidShape)
        #expect(wireError { _ = try step(&random).proto(layer: -1, geometry: Self.geometry) }?.code == .invalidValue)
    }

    @Test("a NaN or infinite element of a decode step is .invalidValue", arguments: [Float.nan, .infinity])
    func decodeNonFinite(bad: Float) throws {
        var random = SeededGenerator.fromEnvironment()
        var message = try step(&random).proto(layer: 2, geometry: Self.geometry)
        message.queries = poisoned(message.queries, at: 33, with: bad)
        let error = wireError { _ = try DecodeStepInput(proto: message, geometry: Self.geometry) }
        #expect(error?.code == .invalidValue)
        #expect(error?.message.hasPrefix("layer 2 queries: element [1, 0, 1] (flat 33) is") == true)
    }

    @Test("a missing decode tensor is .badRequest")
    func decodeMissing() throws {
        var random = SeededGenerator.fromEnvironment()
        var message = try step(&random).proto(layer: 2, geometry: Self.geometry)
        message.clearValues()
        let error = wireError { _ = try DecodeStepInput(proto: message, geometry: Self.geometry) }
        #expect(error?.code == .badRequest)
        #expect(error?.message == "layer 2 values is missing")
    }

    // MARK: Output

    @Test("a layer output round-trips as a float32 [queryHeads, 1, headDim] tensor")
    func outputRoundTrip() throws {
        var random = SeededGenerator.fromEnvironment()
        let output = random.floats(4 * 32)
        let message = try Tessera_V1_LayerOutput(layer: 5, output: output, geometry: Self.geometry)
        #expect(message.layer == 5)
        #expect(message.output.shape == [4, 1, 32])
        #expect(message.output.dtype == .float32)
        #expect(try message.outputValues(geometry: Self.geometry).map(\.bitPattern) == output.map(\.bitPattern))
    }

    @Test("a bad layer output is rejected")
    func badOutput() throws {
        var random = SeededGenerator.fromEnvironment()
        let wrongCount = wireError {
            _ = try Tessera_V1_LayerOutput(layer: 5, output: random.floats(64), geometry: Self.geometry)
        }
        #expect(wrongCount?.code == .invalidShape)

        var nan = random.floats(128)
        nan[0] = .nan
        #expect(
            wireError { _ = try Tessera_V1_LayerOutput(layer: 5, output: nan, geometry: Self.geometry) }?.code
                == .invalidValue
        )

        var message = try Tessera_V1_LayerOutput(layer: 5, output: random.floats(128), geometry: Self.geometry)
        message.output = poisoned(message.output, at: 127)
        #expect(wireError { _ = try message.outputValues(geometry: Self.geometry) }?.code == .invalidValue)

        message.output = try Tessera_V1_Tensor(float16Converting: random.floats(128), shape: [4, 1, 32])
        let half = wireError { _ = try message.outputValues(geometry: Self.geometry) }
        #expect(half?.code == .invalidValue)
        #expect(half?.message == "layer 5 output: dtype must be float32, got float16")

        message.output = try Tessera_V1_Tensor(float32: random.floats(128), shape: [4, 32])
        #expect(wireError { _ = try message.outputValues(geometry: Self.geometry) }?.code == .invalidShape)

        message.clearOutput()
        #expect(wireError { _ = try message.outputValues(geometry: Self.geometry) }?.code == .badRequest)
    }

    // MARK: Prefill

    @Test(
        "a prefill round-trips bit-exactly, with and without observation queries",
        arguments: [(17, 8), (17, 17), (9, 0)]
    )
    func prefillRoundTrip(promptLength: Int, queryRows: Int) throws {
        var random = SeededGenerator.fromEnvironment()
        let input = try random.prefill(geometry: Self.geometry, promptLength: promptLength, queryRows: queryRows)
        let message = try input.proto(layer: 1)
        #expect(message.layer == 1)
        #expect(message.keys.shape == [2, UInt32(promptLength), 32])
        #expect(message.hasQueries == (queryRows > 0))
        if queryRows > 0 { #expect(message.queries.shape == [4, UInt32(queryRows), 32]) }
        let bytes: [UInt8] = try message.serializedBytes()
        let decoded = try LayerPrefill(
            proto: try Tessera_V1_LayerTensors(serializedBytes: bytes),
            geometry: Self.geometry,
            promptLength: promptLength
        )
        #expect(decoded.promptLength == promptLength)
        #expect(decoded.queryRows == queryRows)
        #expect(decoded.geometry == Self.geometry)
        #expect(
            decoded.keys.map { $0.map(\.bitPattern) } == input.keys.map { $0.map(\.bitPattern) },
            "\(random.replay)"
        )
        #expect(
            decoded.values.map { $0.map(\.bitPattern) } == input.values.map { $0.map(\.bitPattern) },
            "\(random.replay)"
        )
        #expect(decoded.queries.map(\.bitPattern) == input.queries.map(\.bitPattern), "\(random.replay)")
    }

    @Test("each KV head is read into an array of its own, with room for the decoded rows asked for")
    func prefillHeadsHaveRoomForDecodeRows() throws {
        var random = SeededGenerator.fromEnvironment()
        let input = try random.prefill(geometry: Self.geometry, promptLength: 9, queryRows: 3)
        let decoded = try LayerPrefill(
            proto: try input.proto(layer: 0),
            geometry: Self.geometry,
            promptLength: 9,
            spareRows: 5
        )
        #expect(decoded.keys == input.keys, "\(random.replay)")
        #expect(decoded.values == input.values, "\(random.replay)")
        for head in decoded.keys + decoded.values {
            #expect(head.count == 9 * 32)
            #expect(head.capacity >= (9 + 5) * 32)
        }
    }

    @Test("float16 keys and values with float32 queries")
    func prefillFloat16() throws {
        var random = SeededGenerator.fromEnvironment()
        let input = try random.prefill(geometry: Self.geometry, promptLength: 10, queryRows: 4)
        let message = try input.proto(layer: 0, scalarType: .float16)
        #expect(message.keys.dtype == .float16)
        #expect(message.values.dtype == .float16)
        #expect(message.queries.dtype == .float32)
        let decoded = try LayerPrefill(proto: message, geometry: Self.geometry, promptLength: 10)
        #expect(decoded.keys == input.keys.map { $0.map { Float(Float16($0)) } }, "\(random.replay)")
        #expect(decoded.queries.map(\.bitPattern) == input.queries.map(\.bitPattern), "\(random.replay)")
    }

    @Test("wrong prefill shapes are .invalidShape naming the tensor")
    func prefillWrongShape() throws {
        var random = SeededGenerator.fromEnvironment()
        let message = try random.prefill(geometry: Self.geometry, promptLength: 12, queryRows: 4).proto(layer: 7)

        // The layout says 13 positions, the tensors hold 12.
        let length = wireError { _ = try LayerPrefill(proto: message, geometry: Self.geometry, promptLength: 13) }
        #expect(length?.code == .invalidShape)
        #expect(length?.message == "layer 7 keys: expected shape [2, 13, 32], got [2, 12, 32]")

        // More query rows than positions.
        var rows = message
        rows.queries = try Tessera_V1_Tensor(float32: random.floats(4 * 13 * 32), shape: [4, 13, 32])
        let rowsError = wireError { _ = try LayerPrefill(proto: rows, geometry: Self.geometry, promptLength: 12) }
        #expect(rowsError?.code == .invalidShape)
        #expect(
            rowsError?.message == "layer 7 queries: expected shape [4, rows, 32] with rows in 1...12, got [4, 13, 32]"
        )

        // Queries of KV-head count.
        var heads = message
        heads.queries = try Tessera_V1_Tensor(float32: random.floats(2 * 4 * 32), shape: [2, 4, 32])
        #expect(
            wireError { _ = try LayerPrefill(proto: heads, geometry: Self.geometry, promptLength: 12) }?.code
                == .invalidShape
        )

        // Rank 2 queries.
        var flat = message
        flat.queries.shape = [16, 32]
        #expect(
            wireError { _ = try LayerPrefill(proto: flat, geometry: Self.geometry, promptLength: 12) }?.code
                == .invalidShape
        )

        // Missing keys.
        var missing = message
        missing.clearKeys()
        let missingError = wireError { _ = try LayerPrefill(proto: missing, geometry: Self.geometry, promptLength: 12) }
        #expect(missingError?.code == .badRequest)
        #expect(missingError?.message == "layer 7 keys is missing")

        #expect(
            wireError { _ = try LayerPrefill(proto: message, geometry: Self.geometry, promptLength: 0) }?.code
                == .invalidShape
        )
    }

    @Test("a NaN in prefill keys, values or queries is .invalidValue")
    func prefillNaN() throws {
        var random = SeededGenerator.fromEnvironment()
        let message = try random.prefill(geometry: Self.geometry, promptLength: 6, queryRows: 2).proto(layer: 1)
        var keys = message
        keys.keys = poisoned(keys.keys, at: 300)  // KV head 1, position 3, element 12
        var values = message
        values.values = poisoned(values.values, at: 0, with: -.infinity)
        var queries = message
        queries.queries = poisoned(queries.queries, at: 255)
        for (name, bad) in [("keys", keys), ("values", values), ("queries", queries)] {
            let error = wireError { _ = try LayerPrefill(proto: bad, geometry: Self.geometry, promptLength: 6) }
            #expect(error?.code == .invalidValue, "\(name)")
            #expect(error?.message.hasPrefix("layer 1 \(name): element") == true, "\(error?.message ?? "")")
        }
        // The position is the tensor's, not the KV head's it was cut into.
        let keysError = wireError { _ = try LayerPrefill(proto: keys, geometry: Self.geometry, promptLength: 6) }
        #expect(
            keysError?.message.hasPrefix("layer 1 keys: element [1, 3, 12] (flat 300) is NaN") == true,
            "\(keysError?.message ?? "")"
        )

        // On the sending side, an element of the second KV head's array is named where it sits in
        // the tensor, in either dtype.
        let clean = try random.prefill(geometry: Self.geometry, promptLength: 6, queryRows: 2)
        var poisonedKeys = clean.keys
        poisonedKeys[1][100] = .nan
        let unchecked = try LayerPrefill(
            geometry: Self.geometry,
            promptLength: 6,
            keys: poisonedKeys,
            values: clean.values,
            queries: clean.queries,
            queryRows: 2,
            checkedFinite: true
        )
        for scalarType in [ScalarType.float32, .float16] {
            let sent = wireError { _ = try unchecked.proto(layer: 1, scalarType: scalarType) }
            #expect(sent?.code == .invalidValue)
            #expect(
                sent?.message.hasPrefix("layer 1 keys: element [1, 3, 4] (flat 292) is NaN") == true,
                "\(sent?.message ?? "")"
            )
        }

        // And on the sending side, float16 overflow.
        var big = try random.prefill(geometry: Self.geometry, promptLength: 6, queryRows: 2)
        big = try LayerPrefill(
            geometry: Self.geometry,
            promptLength: 6,
            keys: LayerPrefill.contiguous(big.keys).map { $0 * 1e6 },
            values: LayerPrefill.contiguous(big.values),
            queries: big.queries,
            queryRows: 2
        )
        #expect(wireError { _ = try big.proto(layer: 1, scalarType: .float16) }?.code == .invalidValue)
    }
}

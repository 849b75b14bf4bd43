import ClusterWire
import Testing

@Suite("Tensor coding")
struct TensorCodingTests {
    @Test("float32 round trip is bit exact, little-endian on the wire")
    func float32RoundTrip() throws {
        var random = SeededGenerator.fromEnvironment()
        let shape = [2, 3, 5]
        let values = (0..<30).map { _ in Float.random(in: -1000...1000, using: &random) }
        let tensor = try Tessera_V1_Tensor(float32: values, shape: shape, name: "keys")
        #expect(tensor.dtype == .float32)
        #expect(tensor.shape == [2, 3, 5])
        #expect(tensor.data.count == 120)
        let first = values[0].bitPattern
        #expect(
            Array(tensor.data.prefix(4)) == [
                UInt8(first & 0xFF), UInt8(first >> 8 & 0xFF), UInt8(first >> 16 & 0xFF), UInt8(first >> 24),
            ]
        )
        let decoded = try tensor.floatValues(name: "keys", expectedShape: shape)
        #expect(decoded.map(\.bitPattern) == values.map(\.bitPattern), "\(random.replay)")
    }

    @Test("float16 round trip, and widening to Float32")
    func float16RoundTrip() throws {
        var random = SeededGenerator.fromEnvironment()
        let halves = (0..<64).map { _ in Float16(Float.random(in: -60000...60000, using: &random)) }
        let tensor = try Tessera_V1_Tensor(float16: halves, shape: [4, 16])
        #expect(tensor.dtype == .float16)
        #expect(tensor.data.count == 128)
        #expect(try tensor.float16Values().map(\.bitPattern) == halves.map(\.bitPattern), "\(random.replay)")
        #expect(try tensor.floatValues() == halves.map(Float.init), "\(random.replay)")

        let converted = try Tessera_V1_Tensor(float16Converting: [1.5, -2, 65504], shape: [3])
        #expect(try converted.float16Values() == [1.5, -2, 65504])
    }

    @Test("a byte count that does not match the shape is .invalidShape naming both", arguments: [-1, 1, -4, 4])
    func wrongByteCount(delta: Int) throws {
        var tensor = try Tessera_V1_Tensor(float32: [Float](repeating: 1, count: 24), shape: [2, 3, 4])
        if delta < 0 {
            tensor.data.removeLast(-delta)
        } else {
            tensor.data.append(contentsOf: [UInt8](repeating: 0, count: delta))
        }
        let error = wireError { _ = try tensor.floatValues(name: "layer 3 keys") }
        #expect(error?.code == .invalidShape)
        #expect(error?.message == "layer 3 keys: shape [2, 3, 4] of float32 needs 96 bytes, got \(96 + delta)")
    }

    @Test("a shape other than the expected one is .invalidShape naming both")
    func unexpectedShape() throws {
        let tensor = try Tessera_V1_Tensor(float32: [Float](repeating: 1, count: 24), shape: [2, 3, 4])
        let error = wireError { _ = try tensor.floatValues(name: "queries", expectedShape: [2, 4, 3]) }
        #expect(error?.code == .invalidShape)
        #expect(error?.message == "queries: expected shape [2, 4, 3], got [2, 3, 4]")
    }

    @Test("bad shapes are refused", arguments: [[Int](), [0], [3, 0, 2], [Int.max, 4]])
    func badShapes(shape: [Int]) throws {
        var tensor = Tessera_V1_Tensor()
        tensor.dtype = .float32
        tensor.shape = shape.map { UInt32(truncatingIfNeeded: $0) }
        #expect(wireError { _ = try tensor.floatValues() }?.code == .invalidShape)
        #expect(wireError { _ = try Tessera_V1_Tensor(float32: [1], shape: shape) }?.code == .invalidShape)
    }

    @Test("a value count that does not match the shape is refused when building")
    func wrongValueCount() {
        let error = wireError { _ = try Tessera_V1_Tensor(float32: [1, 2, 3], shape: [2, 2], name: "values") }
        #expect(error?.code == .invalidShape)
        #expect(error?.message == "values: shape [2, 2] holds 4 elements, got 3 values")
    }

    @Test(
        "an unspecified or unknown dtype is .invalidValue",
        arguments: [Tessera_V1_ScalarType.unspecified, .UNRECOGNIZED(5)]
    )
    func badDType(dtype: Tessera_V1_ScalarType) throws {
        var tensor = try Tessera_V1_Tensor(float32: [1, 2], shape: [2])
        tensor.dtype = dtype
        let error = wireError { _ = try tensor.floatValues() }
        #expect(error?.code == .invalidValue)
        #expect(error?.message.contains("dtype must be FLOAT32 (1) or FLOAT16 (2), got \(dtype.rawValue)") == true)
    }

    @Test("NaN and infinities are .invalidValue naming the element", arguments: [Float.nan, .infinity, -.infinity])
    func nonFinite(bad: Float) throws {
        var values = [Float](repeating: 0.5, count: 12)
        values[7] = bad
        let building = wireError { _ = try Tessera_V1_Tensor(float32: values, shape: [3, 4], name: "keys") }
        #expect(building?.code == .invalidValue)
        #expect(building?.message.contains("keys: element [1, 3] (flat 7) is") == true, "\(building?.message ?? "")")

        // A NaN that arrives over the wire (built around the check).
        var tensor = try Tessera_V1_Tensor(float32: [Float](repeating: 0.5, count: 12), shape: [3, 4])
        let bits = bad.bitPattern
        tensor.data.replaceSubrange(
            28..<32,
            with: [UInt8(bits & 0xFF), UInt8(bits >> 8 & 0xFF), UInt8(bits >> 16 & 0xFF), UInt8(bits >> 24)]
        )
        let reading = wireError { _ = try tensor.floatValues(name: "keys") }
        #expect(reading?.code == .invalidValue)
        #expect(reading?.message.contains(bad.isNaN ? "is NaN" : "infinity") == true)

        // The same in float16.
        var half = try Tessera_V1_Tensor(float16: [Float16](repeating: 1, count: 4), shape: [4])
        let halfBits = Float16(bad).bitPattern
        half.data.replaceSubrange(2..<4, with: [UInt8(halfBits & 0xFF), UInt8(halfBits >> 8)])
        #expect(wireError { _ = try half.float16Values() }?.code == .invalidValue)
        #expect(wireError { _ = try half.floatValues() }?.code == .invalidValue)
    }

    @Test("float16 conversion refuses values out of float16 range")
    func float16Overflow() {
        let error = wireError { _ = try Tessera_V1_Tensor(float16Converting: [1, 70000], shape: [2], name: "v") }
        #expect(error?.code == .invalidValue)
        #expect(error?.message.contains("70000") == true)
    }

    @Test("float16Values refuses a float32 tensor")
    func noSilentNarrowing() throws {
        let tensor = try Tessera_V1_Tensor(float32: [1, 2], shape: [2])
        #expect(wireError { _ = try tensor.float16Values() }?.code == .invalidValue)
    }
}

internal import KVCacheCore

#if canImport(FoundationEssentials)
internal import FoundationEssentials
#else
internal import Foundation
#endif

/// The element type of a tensor on the wire (`tessera.v1.ScalarType`).
public enum WireScalarType: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    case float32
    case float16

    /// Bytes per element.
    public var byteWidth: Int {
        switch self {
        case .float32: 4
        case .float16: 2
        }
    }

    public var description: String { self.rawValue }

    package var proto: Tessera_V1_ScalarType {
        switch self {
        case .float32: .float32
        case .float16: .float16
        }
    }

    /// `nil` for `UNSPECIFIED` and unknown values.
    package init?(proto: Tessera_V1_ScalarType) {
        switch proto {
        case .float32: self = .float32
        case .float16: self = .float16
        case .unspecified, .UNRECOGNIZED: return nil
        }
    }
}

/// Converting between arrays of elements and `Tensor` messages, with the checks every receiver
/// needs: a known dtype, a shape whose element count times the element width equals the byte count,
/// optionally an expected shape, and finite elements.
///
/// Every function takes a `name` ("layer 3 keys") that error messages start with.
extension Tessera_V1_Tensor {
    // MARK: Building

    /// A float32 tensor holding `values`, row-major, with the given shape.
    ///
    /// - Throws: `.invalidShape` when the shape is empty, has a zero dimension, or its element count
    ///   differs from `values.count`; `.invalidValue` when an element is not finite.
    package init(float32 values: [Float], shape: [Int], name: String = "tensor") throws(WireError) {
        try self.init(float32Parts: [values], shape: shape, name: name)
    }

    /// A float32 tensor holding `parts` back to back (a prefill's arrays, one per KV head), copied
    /// once into the message.
    ///
    /// - Throws: as `init(float32:shape:name:)`, for the parts' elements together.
    package init(float32Parts parts: [[Float]], shape: [Int], name: String = "tensor") throws(WireError) {
        let shape32 = try Self.checkShape(shape, elementCount: Self.count(parts), name: name)
        try Self.checkFinite(parts, shape: shape, name: name)
        var data = Data(capacity: Self.count(parts) * MemoryLayout<Float>.size)
        for part in parts { part.withUnsafeBufferPointer { data.append($0) } }
        self.init(.float32, shape: shape32, data: data)
    }

    /// A float16 tensor holding `values`, row-major, with the given shape.
    ///
    /// - Throws: as `init(float32:shape:name:)`.
    package init(float16 values: [Float16], shape: [Int], name: String = "tensor") throws(WireError) {
        let shape32 = try Self.checkShape(shape, elementCount: values.count, name: name)
        try Self.checkFinite(values, shape: shape, name: name)
        self.init(.float16, shape: shape32, data: Self.littleEndianData(values))
    }

    /// A float16 tensor holding `values` rounded to the nearest float16.
    ///
    /// - Throws: as `init(float32:shape:name:)`; `.invalidValue` also when a finite value is too
    ///   large for float16 (magnitude above 65504).
    package init(float16Converting values: [Float], shape: [Int], name: String = "tensor") throws(WireError) {
        try self.init(float16ConvertingParts: [values], shape: shape, name: name)
    }

    /// A float16 tensor holding `parts` back to back, rounded as `init(float16Converting:shape:name:)`
    /// rounds them.
    package init(float16ConvertingParts parts: [[Float]], shape: [Int], name: String = "tensor") throws(WireError) {
        let count = Self.count(parts)
        let shape32 = try Self.checkShape(shape, elementCount: count, name: name)
        try Self.checkFinite(parts, shape: shape, name: name)
        // Rounded by the kernel (F16C where the CPU has it); a value past float16's range becomes infinite.
        let halves = [Float16](unsafeUninitializedCapacity: count) { buffer, initialized in
            var offset = 0
            for part in parts {
                part.withUnsafeBufferPointer {
                    if $0.count > 0 {
                        Float16.store($0.baseAddress!, into: buffer.baseAddress! + offset, count: $0.count)
                    }
                }
                offset += part.count
            }
            initialized = count
        }
        if let index = halves.firstIndex(where: { !$0.isFinite }) {
            let value = Self.element(index, of: parts)
            throw WireError(
                .invalidValue,
                "\(name): element \(Self.position(of: index, in: shape)) = \(value) is out of float16 range "
                    + "(largest magnitude \(Float16.greatestFiniteMagnitude))"
            )
        }
        // Finite halves of finite values: checked once, above.
        self.init(.float16, shape: shape32, data: Self.littleEndianData(halves))
    }

    /// A tensor of checked shape and elements.
    private init(_ dtype: Tessera_V1_ScalarType, shape: [UInt32], data: Data) {
        self.init()
        self.dtype = dtype
        self.shape = shape
        self.data = data
    }

    // MARK: Reading

    /// The validated element type and shape of the tensor.
    ///
    /// - Parameter expectedShape: when given, the shape must equal it.
    /// - Throws: `.invalidValue` for an unspecified or unknown dtype; `.invalidShape` for an empty
    ///   shape, a zero dimension, a shape other than `expectedShape`, or a byte count other than
    ///   element count × element width.
    package func validatedLayout(
        name: String = "tensor",
        expectedShape: [Int]? = nil
    ) throws(WireError) -> (scalarType: WireScalarType, shape: [Int]) {
        guard let scalarType = WireScalarType(proto: self.dtype) else {
            throw WireError(
                .invalidValue,
                "\(name): dtype must be FLOAT32 (1) or FLOAT16 (2), got \(self.dtype.rawValue)"
            )
        }
        let shape = self.shape.map { Int($0) }
        if let expectedShape, shape != expectedShape {
            throw WireError(.invalidShape, "\(name): expected shape \(expectedShape), got \(shape)")
        }
        let elementCount = try Self.elementCount(of: shape, name: name)
        let (expectedBytes, overflow) = elementCount.multipliedReportingOverflow(by: scalarType.byteWidth)
        guard !overflow, expectedBytes == self.data.count else {
            throw WireError(
                .invalidShape,
                "\(name): shape \(shape) of \(scalarType) needs "
                    + (overflow ? "more than \(Int.max)" : "\(expectedBytes)")
                    + " bytes, got \(self.data.count)"
            )
        }
        return (scalarType, shape)
    }

    /// The elements as Float32 (a float16 tensor is widened exactly), after the checks of
    /// `validatedLayout(name:expectedShape:)` and a finiteness check (`.invalidValue`), in one pass
    /// over the bytes.
    /// `spare`: room for that many more elements in the array (rows a cache will append).
    package func floatValues(
        name: String = "tensor",
        expectedShape: [Int]? = nil,
        spare: Int = 0
    ) throws(WireError) -> [Float] {
        try self.floatValues(cutInto: { _ in 1 }, name: name, expectedShape: expectedShape, spare: spare)[0]
    }

    /// The same elements cut along the first dimension, one array per index (a KV head's rows),
    /// each with room for `spare` more elements; still one pass over the bytes.
    package func floatValuesByFirstDimension(
        name: String = "tensor",
        expectedShape: [Int]? = nil,
        spare: Int = 0
    ) throws(WireError) -> [[Float]] {
        try self.floatValues(cutInto: { $0[0] }, name: name, expectedShape: expectedShape, spare: spare)
    }

    /// The checked, widened elements in `cutInto(shape)` equal arrays, each with room for `spare`
    /// more; a non-finite element is named by its place in the whole tensor.
    private func floatValues(
        cutInto partCount: ([Int]) -> Int,
        name: String,
        expectedShape: [Int]?,
        spare: Int
    ) throws(WireError) -> [[Float]] {
        let (scalarType, shape) = try self.validatedLayout(name: name, expectedShape: expectedShape)
        let count = partCount(shape)
        let partBytes = self.data.count / count
        var parts: [[Float]] = []
        parts.reserveCapacity(count)
        var failure: Int?
        self.data.withUnsafeBytes { bytes in
            for part in 0..<count {
                let slice = UnsafeRawBufferPointer(rebasing: bytes[(part * partBytes)..<((part + 1) * partBytes)])
                switch Self.widened(slice, scalarType, spare: spare) {
                case .finite(let values): parts.append(values)
                case .nonFinite(let index):
                    failure = part * (partBytes / scalarType.byteWidth) + index
                    return
                }
            }
        }
        if let failure { throw self.nonFinite(at: failure, shape: shape, name: name) }
        return parts
    }

    private static func widened(
        _ bytes: UnsafeRawBufferPointer,
        _ scalarType: WireScalarType,
        spare: Int
    ) -> FiniteElements.Checked<Float> {
        switch scalarType {
        case .float32: FiniteElements.float32(bytes, spare: spare)
        case .float16: FiniteElements.widenedFloat16(bytes, spare: spare)
        }
    }

    /// The elements of a float16 tensor, after the checks of `floatValues(name:expectedShape:)`.
    ///
    /// - Throws: also `.invalidValue` when the tensor is not float16 (no silent narrowing).
    package func float16Values(
        name: String = "tensor",
        expectedShape: [Int]? = nil,
        spare: Int = 0
    ) throws(WireError) -> [Float16] {
        let (scalarType, shape) = try self.validatedLayout(name: name, expectedShape: expectedShape)
        guard scalarType == .float16 else {
            throw WireError(.invalidValue, "\(name): expected dtype float16, got \(scalarType)")
        }
        let checked = self.data.withUnsafeBytes { FiniteElements.float16($0, spare: spare) }
        return try self.finite(checked, shape: shape, name: name)
    }

    // MARK: Checks

    /// The element count of a shape: rank at least 1, every dimension at least 1, no overflow.
    private static func elementCount(of shape: [Int], name: String) throws(WireError) -> Int {
        guard !shape.isEmpty else {
            throw WireError(.invalidShape, "\(name): shape must have at least one dimension, got []")
        }
        var count = 1
        for dimension in shape {
            guard dimension >= 1 else {
                throw WireError(.invalidShape, "\(name): every dimension must be at least 1, got shape \(shape)")
            }
            let (product, overflow) = count.multipliedReportingOverflow(by: dimension)
            guard !overflow else {
                throw WireError(.invalidShape, "\(name): shape \(shape) has more than \(Int.max) elements")
            }
            count = product
        }
        return count
    }

    /// The shape as `uint32`s, after checking it holds exactly `elementCount` elements.
    private static func checkShape(_ shape: [Int], elementCount: Int, name: String) throws(WireError) -> [UInt32] {
        for dimension in shape where dimension > Int(UInt32.max) {
            throw WireError(.invalidShape, "\(name): dimension \(dimension) of shape \(shape) exceeds \(UInt32.max)")
        }
        let expected = try Self.elementCount(of: shape, name: name)
        guard expected == elementCount else {
            throw WireError(
                .invalidShape,
                "\(name): shape \(shape) holds \(expected) elements, got \(elementCount) values"
            )
        }
        return shape.map { UInt32($0) }
    }

    private static func checkFinite<Element: BinaryFloatingPoint>(
        _ values: [Element],
        shape: [Int],
        name: String
    ) throws(WireError) {
        guard let index = values.firstIndex(where: { !$0.isFinite }) else { return }
        throw nonFinite(values[index], at: index, shape: shape, name: name)
    }

    /// Float32 elements checked by the kernel, a vector at a time.
    private static func checkFinite(_ parts: [[Float]], shape: [Int], name: String) throws(WireError) {
        var offset = 0
        for part in parts {
            if let index = FiniteElements.firstNonFinite(part) {
                throw nonFinite(part[index], at: offset + index, shape: shape, name: name)
            }
            offset += part.count
        }
    }

    private static func count(_ parts: [[Float]]) -> Int { parts.reduce(0) { $0 + $1.count } }

    /// Element `index` of `parts` taken back to back.
    private static func element(_ index: Int, of parts: [[Float]]) -> Float {
        var rest = index
        for part in parts {
            if rest < part.count { return part[rest] }
            rest -= part.count
        }
        preconditionFailure("element \(index) of \(count(parts))")
    }

    /// The elements of a checked copy, or `.invalidValue` naming the first non-finite one.
    private func finite<Element>(
        _ checked: FiniteElements.Checked<Element>,
        shape: [Int],
        name: String
    ) throws(WireError) -> [Element] {
        switch checked {
        case .finite(let values):
            return values
        case .nonFinite(let index):
            throw self.nonFinite(at: index, shape: shape, name: name)
        }
    }

    /// The error for element `index`, which is not finite.
    private func nonFinite(at index: Int, shape: [Int], name: String) -> WireError {
        let value = self.data.withUnsafeBytes { bytes in
            self.dtype == .float16
                ? Float(Float16(bitPattern: bytes.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self)))
                : Float(bitPattern: bytes.loadUnaligned(fromByteOffset: 4 * index, as: UInt32.self))
        }
        return Self.nonFinite(value, at: index, shape: shape, name: name)
    }

    private static func nonFinite<Element: BinaryFloatingPoint>(
        _ value: Element,
        at index: Int,
        shape: [Int],
        name: String
    ) -> WireError {
        let what = value.isNaN ? "NaN" : (value < 0 ? "-infinity" : "infinity")
        return WireError(
            .invalidValue,
            "\(name): element \(Self.position(of: index, in: shape)) is \(what); every element must be finite"
        )
    }

    /// A flat index as a multi-index, e.g. `[1, 0, 7] (flat 39)`, for messages.
    private static func position(of flatIndex: Int, in shape: [Int]) -> String {
        guard shape.count > 1, shape.allSatisfy({ $0 >= 1 }) else { return "\(flatIndex)" }
        var remainder = flatIndex
        var indices = [Int](repeating: 0, count: shape.count)
        for axis in shape.indices.reversed() {
            indices[axis] = remainder % shape[axis]
            remainder /= shape[axis]
        }
        return "\(indices) (flat \(flatIndex))"
    }

    // MARK: Byte order

    /// The elements' bytes, which are little-endian as the wire's because the host is (the ingest
    /// kernels refuse to build for any other).
    private static func littleEndianData<Element: BinaryFloatingPoint>(_ values: [Element]) -> Data {
        values.withUnsafeBytes { Data($0) }
    }
}

import KVCacheCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A refused or unreadable trace file: the file, then what was wrong and what is allowed.
public struct TraceFileError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public var description: String { message }

    public init(_ file: String, _ problem: String) {
        message = "\(file): \(problem)"
    }
}

/// A file in the safetensors format (Hugging Face's): an 8-byte little-endian header length `N`,
/// `N` bytes of JSON header, then the tensors' raw little-endian bytes. The header maps each
/// tensor's name to `{"dtype", "shape", "data_offsets": [begin, end]}` (byte offsets into the data
/// that follows the header) and may hold `"__metadata__"`, a map of strings.
///
/// Reading checks the whole header before any tensor is used: its length against the file, every
/// tensor's byte range against the data and against its dtype and shape (without overflow), and no
/// two ranges overlapping. Elements are checked finite when read.
public struct SafeTensors: Sendable {
    public enum DType: String, Sendable, CaseIterable {
        case f32 = "F32"
        case f16 = "F16"
        case bf16 = "BF16"
        case i32 = "I32"

        public var size: Int { self == .f32 || self == .i32 ? 4 : 2 }
    }

    public struct Entry: Sendable, Hashable {
        public var dtype: DType
        public var shape: [Int]
        /// Byte range in the data section.
        public var range: Range<Int>
    }

    /// The largest header read (the format's reference implementation refuses more than 100 MB).
    public static let maxHeaderBytes = 100_000_000

    /// The file's name, for errors.
    public let file: String
    public private(set) var metadata: [String: String]
    public private(set) var entries: [String: Entry]
    private var data: [UInt8]

    /// An empty file to add tensors to.
    public init(file: String, metadata: [String: String] = [:]) {
        self.file = file
        self.metadata = metadata
        entries = [:]
        data = []
    }

    /// Reads and checks the file at `path`.
    public init(contentsOf path: String) throws(TraceFileError) {
        try self.init(bytes: try Self.contents(of: path), file: path)
    }

    /// The whole file, read straight into an array: one copy of a trace that may be gigabytes.
    private static func contents(of path: String) throws(TraceFileError) -> [UInt8] {
        func failure(_ call: String) -> TraceFileError {
            TraceFileError(path, "cannot be read (\(call)): \(String(cString: strerror(errno)))")
        }
        let descriptor = open(path, O_RDONLY)
        guard descriptor >= 0 else { throw failure("open") }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { throw failure("fstat") }
        let size = Int(status.st_size)
        var error: TraceFileError?
        let bytes = [UInt8](unsafeUninitializedCapacity: max(size, 1)) { buffer, initialized in
            // A file cut short meanwhile ends the read early; its header then disagrees with its size.
            while initialized < size {
                let got = read(descriptor, buffer.baseAddress! + initialized, size - initialized)
                if got < 0, errno == EINTR { continue }
                if got < 0 { error = failure("read") }
                if got <= 0 { return }
                initialized += got
            }
        }
        if let error { throw error }
        return bytes
    }

    /// Parses and checks a whole file's bytes.
    public init(bytes: [UInt8], file: String) throws(TraceFileError) {
        self.file = file
        guard bytes.count >= 8 else {
            throw TraceFileError(file, "\(bytes.count) bytes is too short for the 8-byte header length")
        }
        let length = bytes[0..<8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        guard length <= UInt64(Self.maxHeaderBytes), Int(length) <= bytes.count - 8 else {
            throw TraceFileError(
                file,
                "the header length is \(length) bytes; at most \(min(Self.maxHeaderBytes, bytes.count - 8)) are allowed"
            )
        }
        let headerEnd = 8 + Int(length)
        let fields: [String: HeaderField]
        do {
            fields = try JSONDecoder().decode([String: HeaderField].self, from: Data(bytes[8..<headerEnd]))
        } catch {
            throw TraceFileError(file, "the header is not a JSON object of tensors and __metadata__: \(error)")
        }
        data = Array(bytes[headerEnd...])
        metadata = [:]
        entries = [:]
        for (name, field) in fields {
            switch (name, field) {
            case ("__metadata__", .metadata(let values)):
                metadata = values
            case ("__metadata__", .tensor):
                throw TraceFileError(file, "__metadata__ must map strings to strings")
            case (_, .metadata):
                throw TraceFileError(file, "tensor \(name) needs dtype, shape and data_offsets")
            case (_, .tensor(let dtype, let shape, let offsets)):
                entries[name] = try Self.entry(
                    name,
                    dtype: dtype,
                    shape: shape,
                    offsets: offsets,
                    data: data.count,
                    file
                )
            }
        }
        let ordered = entries.sorted { $0.value.range.lowerBound < $1.value.range.lowerBound }
        for (previous, next) in zip(ordered, ordered.dropFirst())
        where next.value.range.lowerBound < previous.value.range.upperBound {
            throw TraceFileError(file, "tensors \(previous.key) and \(next.key) overlap in the data")
        }
    }

    private static func entry(
        _ name: String,
        dtype text: String,
        shape: [Int],
        offsets: [Int],
        data: Int,
        _ file: String
    ) throws(TraceFileError) -> Entry {
        guard let dtype = DType(rawValue: text) else {
            throw TraceFileError(
                file,
                "tensor \(name) has dtype \(text); allowed: \(DType.allCases.map(\.rawValue).joined(separator: ", "))"
            )
        }
        guard shape.allSatisfy({ $0 >= 0 }), offsets.count == 2, offsets[0] >= 0, offsets[0] <= offsets[1],
            offsets[1] <= data
        else {
            throw TraceFileError(
                file,
                "tensor \(name): shape \(shape) and data_offsets \(offsets) must be non-negative, "
                    + "with begin ≤ end ≤ \(data) (the data's size)"
            )
        }
        var bytes = dtype.size
        for dimension in shape {
            let (product, overflow) = bytes.multipliedReportingOverflow(by: dimension)
            guard !overflow else { throw TraceFileError(file, "tensor \(name): shape \(shape) overflows") }
            bytes = product
        }
        guard offsets[1] - offsets[0] == bytes else {
            throw TraceFileError(
                file,
                "tensor \(name) holds \(offsets[1] - offsets[0]) bytes; \(dtype.rawValue) of shape \(shape) is \(bytes)"
            )
        }
        return Entry(dtype: dtype, shape: shape, range: offsets[0]..<offsets[1])
    }

    /// The shape of tensor `name`, which must exist.
    public func shape(_ name: String) throws(TraceFileError) -> [Int] {
        guard let entry = entries[name] else { throw TraceFileError(file, "no tensor \(name)") }
        return entry.shape
    }

    /// Tensor `name` as Float32 (F16 and BF16 widened exactly), checked against `shape` and finite.
    public func floats(_ name: String, shape expected: [Int]) throws(TraceFileError) -> [Float] {
        guard let entry = entries[name] else { throw TraceFileError(file, "no tensor \(name)") }
        guard entry.shape == expected, entry.dtype != .i32 else {
            throw TraceFileError(
                file,
                "tensor \(name) is \(entry.dtype.rawValue) of shape \(entry.shape); expected F32, F16 or BF16 of shape \(expected)"
            )
        }
        // One pass each, the finiteness check fused into the copy.
        let checked = data.withUnsafeBytes { data -> FiniteElements.Checked<Float> in
            let bytes = UnsafeRawBufferPointer(rebasing: data[entry.range])
            return switch entry.dtype {
            case .f32: FiniteElements.float32(bytes)
            case .f16: FiniteElements.widenedFloat16(bytes)
            case .bf16, .i32: FiniteElements.widenedBFloat16(bytes)  // i32 is refused above
            }
        }
        switch checked {
        case .finite(let values):
            return values
        case .nonFinite(let bad):
            throw TraceFileError(
                file,
                "tensor \(name) element \(bad) is \(element(entry, bad)); every element must be finite"
            )
        }
    }

    /// Element `index` of a float tensor, widened to Float32.
    private func element(_ entry: Entry, _ index: Int) -> Float {
        data.withUnsafeBytes { raw in
            let base = raw.baseAddress! + entry.range.lowerBound
            switch entry.dtype {
            case .f32:
                return Float(
                    bitPattern: UInt32(littleEndian: base.loadUnaligned(fromByteOffset: 4 * index, as: UInt32.self))
                )
            case .f16:
                return Float(
                    Float16(
                        bitPattern: UInt16(littleEndian: base.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self))
                    )
                )
            case .bf16:
                let bits = UInt16(littleEndian: base.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self))
                return Float(bitPattern: UInt32(bits) << 16)
            case .i32:
                return .nan
            }
        }
    }

    /// Tensor `name` as Int32 (it must be I32), checked against `shape`.
    public func int32s(_ name: String, shape expected: [Int]) throws(TraceFileError) -> [Int32] {
        guard let entry = entries[name] else { throw TraceFileError(file, "no tensor \(name)") }
        guard entry.dtype == .i32, entry.shape == expected else {
            throw TraceFileError(
                file,
                "tensor \(name) is \(entry.dtype.rawValue) of shape \(entry.shape); expected I32 of shape \(expected)"
            )
        }
        return data.withUnsafeBytes { raw in
            (0..<entry.shape.reduce(1, *)).map {
                Int32(littleEndian: raw.loadUnaligned(fromByteOffset: entry.range.lowerBound + 4 * $0, as: Int32.self))
            }
        }
    }

    /// Adds (or replaces the metadata value of) `key`.
    public mutating func setMetadata(_ key: String, _ value: String) { metadata[key] = value }

    /// Appends tensor `name` in `dtype` (F32, F16 or BF16; BF16 rounds to nearest even).
    public mutating func add(_ name: String, floats: [Float], shape: [Int], as dtype: DType = .f32) {
        precondition(
            floats.count == shape.reduce(1, *) && dtype != .i32,
            "\(name): shape \(shape), \(floats.count) floats"
        )
        let start = data.count
        for value in floats {
            switch dtype {
            case .f32: append(value.bitPattern, bytes: 4)
            case .f16: append(UInt32(Float16(value).bitPattern), bytes: 2)
            case .bf16:
                let bits = value.bitPattern
                append((bits &+ 0x7fff &+ (bits >> 16 & 1)) >> 16, bytes: 2)
            case .i32: preconditionFailure("Int32 tensors are added with add(_:int32s:shape:)")
            }
        }
        entries[name] = Entry(dtype: dtype, shape: shape, range: start..<data.count)
    }

    /// Appends tensor `name` of Int32.
    public mutating func add(_ name: String, int32s: [Int32], shape: [Int]) {
        precondition(int32s.count == shape.reduce(1, *), "\(name): shape \(shape), \(int32s.count) values")
        let start = data.count
        for value in int32s { append(UInt32(bitPattern: value), bytes: 4) }
        entries[name] = Entry(dtype: .i32, shape: shape, range: start..<data.count)
    }

    private mutating func append(_ bits: UInt32, bytes: Int) {
        for shift in stride(from: 0, to: 8 * bytes, by: 8) { data.append(UInt8(truncatingIfNeeded: bits >> shift)) }
    }

    /// The file's bytes: the header (keys sorted, padded with spaces to a multiple of 8 bytes), then
    /// the data.
    public func serialized() -> [UInt8] {
        var fields: [String: HeaderField] = entries.mapValues {
            .tensor(dtype: $0.dtype.rawValue, shape: $0.shape, offsets: [$0.range.lowerBound, $0.range.upperBound])
        }
        if !metadata.isEmpty { fields["__metadata__"] = .metadata(metadata) }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding strings, integers and arrays of them cannot fail.
        var header = [UInt8]((try? encoder.encode(fields)) ?? Data("{}".utf8))
        header += Array(repeating: UInt8(ascii: " "), count: (8 - header.count % 8) % 8)
        let length = UInt64(header.count)
        return (0..<8).map { UInt8(truncatingIfNeeded: length >> (8 * $0)) } + header + data
    }

    /// Writes the file to `path`.
    public func write(to path: String) throws(TraceFileError) {
        do {
            try Data(serialized()).write(to: URL(fileURLWithPath: path))
        } catch {
            throw TraceFileError(path, "cannot be written: \(error)")
        }
    }
}

/// One value of a safetensors header: a tensor's description, or `__metadata__`.
private enum HeaderField: Codable {
    case tensor(dtype: String, shape: [Int], offsets: [Int])
    case metadata([String: String])

    private enum Keys: String, CodingKey {
        case dtype
        case shape
        case dataOffsets = "data_offsets"
    }

    init(from decoder: any Decoder) throws {
        if let values = try? [String: String](from: decoder) {
            self = .metadata(values)
            return
        }
        let container = try decoder.container(keyedBy: Keys.self)
        self = .tensor(
            dtype: try container.decode(String.self, forKey: .dtype),
            shape: try container.decode([Int].self, forKey: .shape),
            offsets: try container.decode([Int].self, forKey: .dataOffsets)
        )
    }

    func encode(to encoder: any Encoder) throws {
        switch self {
        case .metadata(let values): try values.encode(to: encoder)
        case .tensor(let dtype, let shape, let offsets):
            var container = encoder.container(keyedBy: Keys.self)
            try container.encode(dtype, forKey: .dtype)
            try container.encode(shape, forKey: .shape)
            try container.encode(offsets, forKey: .dataOffsets)
        }
    }
}

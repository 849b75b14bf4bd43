import KVKernels

/// The element type K/V rows are stored in.
public enum ScalarType: String, Sendable, Hashable, Codable, CaseIterable {
    case float32 = "f32"
    case float16 = "f16"

    public var byteWidth: Int {
        switch self {
        case .float32: 4
        case .float16: 2
        }
    }
}

/// A storage element of K/V rows: Float32, or half precision that the C kernels widen as they load.
public protocol KVScalar: BinaryFloatingPoint, Sendable {
    static var scalarType: ScalarType { get }
    /// Non-zero when the C kernels must read this type as IEEE half precision.
    static var isHalf: Int32 { get }
    /// Narrows `count` Float32 values into storage.
    static func store(_ source: UnsafePointer<Float>, into destination: UnsafeMutablePointer<Self>, count: Int)
    init(_ value: Float)
}

extension Float: KVScalar {
    public static var scalarType: ScalarType { .float32 }
    public static var isHalf: Int32 { 0 }

    @inline(__always)
    public static func store(_ source: UnsafePointer<Float>, into destination: UnsafeMutablePointer<Float>, count: Int)
    {
        destination.update(from: source, count: count)
    }
}

extension Float16: KVScalar {
    public static var scalarType: ScalarType { .float16 }
    public static var isHalf: Int32 { 1 }

    /// Rounds to nearest even (`kvk_narrow_to_half`: F16C where the CPU has it).
    @inline(__always)
    public static func store(
        _ source: UnsafePointer<Float>,
        into destination: UnsafeMutablePointer<Float16>,
        count: Int
    ) {
        UnsafeMutableRawPointer(destination).withMemoryRebound(to: UInt16.self, capacity: count) {
            kvk_narrow_to_half(source, $0, count)
        }
    }
}

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

/// A storage element that the kernels can widen to Float32 sixteen lanes at a time.
public protocol KVScalar: BinaryFloatingPoint, Sendable {
    static var scalarType: ScalarType { get }
    /// Non-zero when the C kernels must read this type as IEEE half precision.
    static var isHalf: Int32 { get }
    /// Sixteen consecutive elements from `pointer`, widened to Float32.
    static func load16(_ pointer: UnsafePointer<Self>) -> SIMD16<Float>
    /// Narrows `count` Float32 values into storage, sixteen lanes at a time.
    static func store(_ source: UnsafePointer<Float>, into destination: UnsafeMutablePointer<Self>, count: Int)
    init(_ value: Float)
}

extension Float: KVScalar {
    public static var scalarType: ScalarType { .float32 }
    public static var isHalf: Int32 { 0 }

    @inline(__always)
    public static func load16(_ pointer: UnsafePointer<Float>) -> SIMD16<Float> {
        UnsafeRawPointer(pointer).loadUnaligned(as: SIMD16<Float>.self)
    }

    @inline(__always)
    public static func store(_ source: UnsafePointer<Float>, into destination: UnsafeMutablePointer<Float>, count: Int) {
        destination.update(from: source, count: count)
    }
}

extension Float16: KVScalar {
    public static var scalarType: ScalarType { .float16 }
    public static var isHalf: Int32 { 1 }

    @inline(__always)
    public static func load16(_ pointer: UnsafePointer<Float16>) -> SIMD16<Float> {
        SIMD16<Float>(UnsafeRawPointer(pointer).loadUnaligned(as: SIMD16<Float16>.self))
    }

    @inline(__always)
    public static func store(_ source: UnsafePointer<Float>, into destination: UnsafeMutablePointer<Float16>, count: Int) {
        var i = 0
        while i + 16 <= count {
            let wide = UnsafeRawPointer(source + i).loadUnaligned(as: SIMD16<Float>.self)
            UnsafeMutableRawPointer(destination + i).storeBytes(of: SIMD16<Float16>(wide), as: SIMD16<Float16>.self)
            i += 16
        }
        while i < count {
            destination[i] = Float16(source[i])
            i += 1
        }
    }
}

import KVKernels

/// Little-endian tensor bytes (as the wire carries them, at any alignment) into arrays, with the
/// check every receiver makes — each element finite — fused into the same pass, so a tensor is read
/// once on its way into storage.
public enum FiniteElements {
    /// The outcome of a checked copy: the array, or the flat index of the first NaN or infinity.
    public enum Checked<Element> {
        case finite([Element])
        case nonFinite(index: Int)
    }

    /// `bytes.count / 4` Float32 elements, in an array with room for `spare` more.
    public static func float32(_ bytes: UnsafeRawBufferPointer, spare: Int = 0) -> Checked<Float> {
        copy(bytes, width: 4, spare: spare) { source, destination, count in
            kvk_load_finite_f32(source, destination, count)
        }
    }

    /// `bytes.count / 2` half-precision elements, kept as they are, in an array with room for `spare`
    /// more.
    public static func float16(_ bytes: UnsafeRawBufferPointer, spare: Int = 0) -> Checked<Float16> {
        copy(bytes, width: 2, spare: spare) { source, destination, count in
            destination.withMemoryRebound(to: UInt16.self, capacity: count) {
                kvk_load_finite_f16(source, $0, count)
            }
        }
    }

    /// `bytes.count / 2` half-precision elements widened to Float32 (exactly), in an array with room
    /// for `spare` more.
    public static func widenedFloat16(_ bytes: UnsafeRawBufferPointer, spare: Int = 0) -> Checked<Float> {
        copy(bytes, width: 2, spare: spare) { source, destination, count in
            kvk_widen_finite_f16(source, destination, count)
        }
    }

    /// `bytes.count / 2` bfloat16 elements widened to Float32 (exactly: a bfloat16 is the top half
    /// of a Float32).
    public static func widenedBFloat16(_ bytes: UnsafeRawBufferPointer) -> Checked<Float> {
        copy(bytes, width: 2, spare: 0) { source, destination, count in
            guard let source else { return count }
            for index in 0..<count {
                let bits = UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self))
                destination[index] = Float(bitPattern: UInt32(bits) << 16)
            }
            return kvk_first_nonfinite_f32(destination, count)
        }
    }

    /// The index of the first element of `values` that is NaN or infinite, or nil when all are finite.
    public static func firstNonFinite(_ values: [Float]) -> Int? {
        let index = values.withUnsafeBufferPointer { kvk_first_nonfinite_f32($0.baseAddress, $0.count) }
        return index < values.count ? index : nil
    }

    private static func copy<Element>(
        _ bytes: UnsafeRawBufferPointer,
        width: Int,
        spare: Int,
        _ kernel: (UnsafeRawPointer?, UnsafeMutablePointer<Element>, Int) -> Int
    ) -> Checked<Element> {
        let count = bytes.count / width
        var failure: Int?
        let values = [Element](unsafeUninitializedCapacity: count + max(0, spare)) { buffer, initialized in
            guard let destination = buffer.baseAddress else { return }
            let checked = kernel(bytes.baseAddress, destination, count)
            // A failed copy is dropped whole: nothing of it is kept.
            if checked < count { failure = checked } else { initialized = count }
        }
        if let failure { return .nonFinite(index: failure) }
        return .finite(values)
    }
}

internal import NIOCore
internal import SwiftProtobuf

/// Lets swift-protobuf read from and serialize into a `ByteBuffer` without an intermediate array.
///
/// An adapter rather than a conformance of `ByteBuffer` itself: conforming a foreign type to a
/// foreign protocol could clash with another module doing the same (as grpc-swift's
/// `ContiguousBytesAdapter` avoids too).
struct ByteBufferBytes: SwiftProtobufContiguousBytes {
    var buffer: ByteBuffer

    init(_ buffer: ByteBuffer) {
        self.buffer = buffer
    }

    init(repeating byte: UInt8, count: Int) {
        self.buffer = ByteBufferAllocator().buffer(repeating: byte, count: count)
    }

    init<S: Sequence>(_ sequence: S) where S.Element == UInt8 {
        self.buffer = ByteBuffer(bytes: sequence)
    }

    var count: Int { self.buffer.readableBytes }

    func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try self.buffer.withUnsafeReadableBytes(body)
    }

    mutating func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try self.buffer.withUnsafeMutableReadableBytes(body)
    }
}

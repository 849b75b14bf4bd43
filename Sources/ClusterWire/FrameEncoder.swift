public import NIOCore

/// Writes each outbound `ByteBuffer` as one frame: a 4-byte big-endian length, then the bytes.
///
/// An empty payload or one above `maxFrameBytes` is a caller bug on this side of the wire and is
/// refused with a `WireError` (the peer's `FrameDecoder` would reject it and close the connection).
/// Use it through `MessageToByteHandler(FrameEncoder())`.
public struct FrameEncoder: MessageToByteEncoder, Sendable {
    public typealias OutboundIn = ByteBuffer

    /// The largest payload written.
    public let maxFrameBytes: Int

    /// - Parameter maxFrameBytes: the largest payload to write, in 1...`UInt32.max`; keep it equal to
    ///   the peer's `FrameDecoder.maxFrameBytes`.
    public init(maxFrameBytes: Int = FrameDecoder.defaultMaxFrameBytes) {
        precondition(
            maxFrameBytes >= 1 && maxFrameBytes <= Int(UInt32.max),
            "maxFrameBytes must be in 1...\(UInt32.max), got \(maxFrameBytes)"
        )
        self.maxFrameBytes = maxFrameBytes
    }

    public func encode(data: ByteBuffer, out: inout ByteBuffer) throws {
        let length = data.readableBytes
        guard length > 0 else {
            throw WireError(.malformedFrame, "refusing to write a zero-length frame")
        }
        guard length <= self.maxFrameBytes else {
            throw WireError(
                .frameTooLarge,
                "refusing to write a frame of \(length) bytes: the limit is \(self.maxFrameBytes) bytes"
            )
        }
        out.reserveCapacity(minimumWritableBytes: FrameDecoder.headerBytes + length)
        out.writeInteger(UInt32(length), endianness: .big)
        out.writeImmutableBuffer(data)
    }
}

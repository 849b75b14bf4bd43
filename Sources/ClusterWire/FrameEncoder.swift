public import NIOCore

/// Writes each outbound `ByteBuffer` as one frame: a 4-byte big-endian length, then the bytes.
///
/// An empty payload or one above `maxFrameBytes` is a caller bug on this side of the wire and is
/// refused with a `WireError` (the peer's `FrameDecoder` would reject it and close the connection).
/// Use it through `FrameEncodingHandler(FrameEncoder())`, which does not copy payloads.
public struct FrameEncoder: Sendable {
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
        let length = try self.checkedLength(of: data)
        out.reserveCapacity(minimumWritableBytes: FrameDecoder.headerBytes + length)
        out.writeInteger(UInt32(length), endianness: .big)
        out.writeImmutableBuffer(data)
    }

    /// The payload's length, after refusing an empty or oversized one.
    fileprivate func checkedLength(of payload: ByteBuffer) throws(WireError) -> Int {
        let length = payload.readableBytes
        guard length > 0 else {
            throw WireError(.malformedFrame, "refusing to write a zero-length frame")
        }
        guard length <= self.maxFrameBytes else {
            throw WireError(
                .frameTooLarge,
                "refusing to write a frame of \(length) bytes: the limit is \(self.maxFrameBytes) bytes"
            )
        }
        return length
    }
}

/// `FrameEncoder` in a pipeline, without copying payloads: the length prefix goes out as a small
/// buffer of its own, ahead of the payload buffer as it is (one `writev` when flushed). A frame that
/// carries megabytes of tensors is then never copied on its way to the socket.
package final class FrameEncodingHandler: ChannelOutboundHandler {
    package typealias OutboundIn = ByteBuffer
    package typealias OutboundOut = ByteBuffer

    private let encoder: FrameEncoder

    package init(_ encoder: FrameEncoder) {
        self.encoder = encoder
    }

    package func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let payload = Self.unwrapOutboundIn(data)
        let length: Int
        do {
            length = try self.encoder.checkedLength(of: payload)
        } catch {
            promise?.fail(error)
            return
        }
        var header = context.channel.allocator.buffer(capacity: FrameDecoder.headerBytes)
        header.writeInteger(UInt32(length), endianness: .big)
        context.write(Self.wrapOutboundOut(header), promise: nil)
        context.write(Self.wrapOutboundOut(payload), promise: promise)
    }
}

@available(*, unavailable)
extension FrameEncodingHandler: Sendable {}

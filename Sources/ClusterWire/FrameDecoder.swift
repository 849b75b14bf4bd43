public import NIOCore

/// Splits a byte stream into frames: a 4-byte big-endian length, then that many bytes of payload.
///
/// The length is checked as soon as the 4 header bytes are readable, before any payload is awaited or
/// buffered for it: a length above `maxFrameBytes` throws `WireError.Code.frameTooLarge`, a length of
/// zero throws `.malformedFrame`. A stream that ends inside a frame throws `.malformedFrame` from
/// `decodeLast`. After any of these the stream cannot be trusted and the connection must be closed.
///
/// Produces a frame that arrived whole as a `ByteBuffer` slice of the input (no copy). Use it through
/// `ByteToMessageHandler(FrameDecoder())`.
///
/// A frame larger than `assembledAbove` that spans several reads is gathered into a buffer of its
/// own size as its bytes arrive, each byte copied once: `ByteToMessageHandler` would otherwise grow
/// one buffer by doubling, copying what it held at every step (about 2.5 copies of a 4 MiB frame
/// read in 1 MiB pieces). With a `FrameBudget`, a frame larger than `FrameBudget.reservedAbove`
/// must reserve its length from the budget the process's connections share before its payload is
/// buffered: a peer that declares large frames and trickles them cannot hold more than the budget,
/// in all connections together.
public struct FrameDecoder: NIOSingleStepByteToMessageDecoder, Sendable {
    public typealias InboundOut = ByteBuffer

    /// The default limit on a frame's payload: 64 MiB.
    public static let defaultMaxFrameBytes = 64 * 1024 * 1024

    /// The size of the length prefix.
    public static let headerBytes = 4

    /// The largest payload accepted; the length prefix of a larger frame is rejected.
    public let maxFrameBytes: Int

    /// Frames larger than this that span several reads are gathered into a buffer of their size.
    public static let assembledAbove = 64 << 10

    private let budget: FrameBudget?
    /// Bytes reserved from `budget` for the frame being received.
    private var reserved = 0
    /// The payload received so far of a large frame being gathered, and its length.
    private var partial: (payload: ByteBuffer, length: Int)?

    /// - Parameters:
    ///   - maxFrameBytes: the largest payload to accept, in 1...`UInt32.max`.
    ///   - budget: the bytes of incomplete large frames the process will buffer, shared by its connections.
    public init(maxFrameBytes: Int = FrameDecoder.defaultMaxFrameBytes, budget: FrameBudget? = nil) {
        precondition(
            maxFrameBytes >= 1 && maxFrameBytes <= Int(UInt32.max),
            "maxFrameBytes must be in 1...\(UInt32.max), got \(maxFrameBytes)"
        )
        self.maxFrameBytes = maxFrameBytes
        self.budget = budget
    }

    public mutating func decode(buffer: inout ByteBuffer) throws -> ByteBuffer? {
        if self.partial != nil { return self.gather(from: &buffer) }
        guard let length = try self.peekLength(buffer) else { return nil }
        guard buffer.readableBytes >= Self.headerBytes + length else {
            try self.reserve(length)
            if length > Self.assembledAbove {
                buffer.moveReaderIndex(forwardBy: Self.headerBytes)
                self.partial = (ByteBufferAllocator().buffer(capacity: length), length)
                return self.gather(from: &buffer)
            }
            return nil
        }
        self.release()
        buffer.moveReaderIndex(forwardBy: Self.headerBytes)
        return buffer.readSlice(length: length)
    }

    /// Moves the frame's bytes from `buffer` into `partial`; the frame once it is complete.
    private mutating func gather(from buffer: inout ByteBuffer) -> ByteBuffer? {
        guard let length = self.partial?.length, let received = self.partial?.payload.readableBytes else { return nil }
        if var bytes = buffer.readSlice(length: min(length - received, buffer.readableBytes)) {
            self.partial!.payload.writeBuffer(&bytes)
        }
        guard let frame = self.partial?.payload, frame.readableBytes == length else { return nil }
        self.partial = nil
        self.release()
        return frame
    }

    public mutating func decoderRemoved(context: ChannelHandlerContext) {
        self.partial = nil
        self.release()
    }

    private mutating func reserve(_ length: Int) throws(WireError) {
        guard let budget, self.reserved == 0, length > FrameBudget.reservedAbove else { return }
        guard budget.take(length) else {
            throw WireError(
                .resourceExhausted,
                "this node already buffers \(budget.limit - budget.available) of its \(budget.limit) bytes for "
                    + "incomplete frames; a frame of \(length) bytes does not fit now",
                retryAfter: .seconds(1)
            )
        }
        self.reserved = length
    }

    private mutating func release() {
        guard self.reserved > 0 else { return }
        self.budget?.give(self.reserved)
        self.reserved = 0
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> ByteBuffer? {
        if let frame = try self.decode(buffer: &buffer) { return frame }
        if let (payload, length) = self.partial {
            self.partial = nil
            self.release()
            throw WireError(
                .malformedFrame,
                "the stream ended inside a frame: a frame of \(length) bytes had only \(payload.readableBytes) "
                    + "payload bytes"
            )
        }
        guard buffer.readableBytes == 0 else {
            let detail: String
            if let length = try self.peekLength(buffer) {
                detail = "a frame of \(length) bytes had only \(buffer.readableBytes - Self.headerBytes) payload bytes"
            } else {
                detail = "only \(buffer.readableBytes) of the \(Self.headerBytes) length-prefix bytes arrived"
            }
            // Drop the partial frame: it has been reported and must not surface as leftovers too.
            buffer.moveReaderIndex(to: buffer.writerIndex)
            throw WireError(.malformedFrame, "the stream ended inside a frame: \(detail)")
        }
        return nil
    }

    /// The length of the frame at the reader index, validated; `nil` while the header is incomplete.
    private func peekLength(_ buffer: ByteBuffer) throws(WireError) -> Int? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, endianness: .big, as: UInt32.self) else {
            return nil
        }
        guard length > 0 else {
            throw WireError(.malformedFrame, "zero-length frame: a frame must carry at least 1 byte of Envelope")
        }
        guard UInt64(length) <= UInt64(self.maxFrameBytes) else {
            throw WireError(
                .frameTooLarge,
                "frame length \(length) bytes exceeds the limit of \(self.maxFrameBytes) bytes"
            )
        }
        return Int(length)
    }
}

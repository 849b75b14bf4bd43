package import NIOCore

/// Turns frames into envelopes and back: the last wire handler before the application (typically an
/// `NIOAsyncChannel<Tessera_V1_Envelope, Tessera_V1_Envelope>`).
///
/// Inbound, a frame that is not a valid Envelope is reported with `fireErrorCaught` (a `WireError`
/// with code `.malformedFrame`) and dropped; the reader should answer with an Error and close the
/// connection. Outbound, an envelope that cannot be serialized fails its write promise.
///
/// Install the whole stack with `ChannelPipeline.SynchronousOperations.addWireHandlers(maxFrameBytes:)`.
package final class EnvelopeCodecHandler: ChannelDuplexHandler {
    package typealias InboundIn = ByteBuffer
    package typealias InboundOut = Tessera_V1_Envelope
    package typealias OutboundIn = Tessera_V1_Envelope
    package typealias OutboundOut = ByteBuffer

    package init() {}

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        let envelope: Tessera_V1_Envelope
        do {
            envelope = try Tessera_V1_Envelope(frame: frame)
        } catch {
            context.fireErrorCaught(error)
            return
        }
        context.fireChannelRead(Self.wrapInboundOut(envelope))
    }

    package func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let envelope = Self.unwrapOutboundIn(data)
        let frame: ByteBuffer
        do {
            frame = try envelope.serializedFrame()
        } catch {
            promise?.fail(error)
            return
        }
        context.write(Self.wrapOutboundOut(frame), promise: promise)
    }
}

@available(*, unavailable)
extension EnvelopeCodecHandler: Sendable {}

extension ChannelPipeline.SynchronousOperations {
    /// Adds the Tessera wire stack: `FrameDecoder` and `FrameEncoder` (4-byte big-endian length
    /// prefix, at most `maxFrameBytes` of payload each way), then `EnvelopeCodecHandler`. Reads then
    /// yield `Tessera_V1_Envelope`s and writes take them.
    package func addWireHandlers(
        maxFrameBytes: Int = FrameDecoder.defaultMaxFrameBytes,
        budget: FrameBudget? = nil
    ) throws {
        try self.addHandler(ByteToMessageHandler(FrameDecoder(maxFrameBytes: maxFrameBytes, budget: budget)))
        try self.addHandler(FrameEncodingHandler(FrameEncoder(maxFrameBytes: maxFrameBytes)))
        try self.addHandler(EnvelopeCodecHandler())
    }
}

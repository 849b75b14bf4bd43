import ClusterWire
import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing

/// A stream of frames, and the frames it must decode to.
private func framedStream(_ payloads: [[UInt8]]) -> (stream: [UInt8], frames: [ByteBuffer]) {
    var stream: [UInt8] = []
    for payload in payloads {
        let length = UInt32(payload.count)
        stream += [UInt8(length >> 24), UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF)]
        stream += payload
    }
    return (stream, payloads.map { ByteBuffer(bytes: $0) })
}

private func decoderChannel(maxFrameBytes: Int = FrameDecoder.defaultMaxFrameBytes) -> EmbeddedChannel {
    EmbeddedChannel(handler: ByteToMessageHandler(FrameDecoder(maxFrameBytes: maxFrameBytes)))
}

private func readAllFrames(_ channel: EmbeddedChannel) throws -> [ByteBuffer] {
    var frames: [ByteBuffer] = []
    while let frame = try channel.readInbound(as: ByteBuffer.self) { frames.append(frame) }
    return frames
}

@Suite("Frame codec")
struct FrameCodecTests {
    @Test("encoder output decodes to the same payloads")
    func roundTrip() throws {
        var random = SeededGenerator.fromEnvironment()
        let payloads = [[UInt8(7)]] + (0..<20).map { _ in random.bytes(Int.random(in: 1...3000, using: &random)) }

        let encoder = EmbeddedChannel(handler: FrameEncodingHandler(FrameEncoder()))
        let decoder = decoderChannel()
        for payload in payloads {
            try encoder.writeOutbound(ByteBuffer(bytes: payload))
            // The length prefix, then the payload buffer itself (not copied).
            let header = try #require(try encoder.readOutbound(as: ByteBuffer.self))
            let body = try #require(try encoder.readOutbound(as: ByteBuffer.self))
            #expect(header == ByteBuffer(integer: UInt32(payload.count), endianness: .big), "\(random.replay)")
            #expect(body == ByteBuffer(bytes: payload))
            try decoder.writeInbound(header)
            try decoder.writeInbound(body)
        }
        let decoded = try readAllFrames(decoder)
        #expect(decoded == payloads.map { ByteBuffer(bytes: $0) }, "\(random.replay)")
        #expect(try encoder.finish().isClean)
        #expect(try decoder.finish().isClean)
    }

    @Test("ByteToMessageDecoderVerifier: drip feed, one frame per write, many frames per write")
    func verifier() throws {
        var random = SeededGenerator.fromEnvironment()
        let pairs = (0..<8).map { index -> (ByteBuffer, [ByteBuffer]) in
            let payload = random.bytes(index == 0 ? 1 : Int.random(in: 1...300, using: &random))
            let (stream, frames) = framedStream([payload])
            return (ByteBuffer(bytes: stream), frames)
        }
        do {
            try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) { FrameDecoder() }
        } catch {
            Issue.record("verifier failed: \(error). \(random.replay)")
        }
    }

    @Test("a stream split at every byte boundary decodes to the same frames")
    func splitAtEveryBoundary() throws {
        var random = SeededGenerator.fromEnvironment()
        let payloads = [[UInt8(1)], random.bytes(5), random.bytes(300), random.bytes(2), random.bytes(70)]
        let (stream, expected) = framedStream(payloads)
        for split in 0...stream.count {
            let channel = decoderChannel()
            try channel.writeInbound(ByteBuffer(bytes: stream[..<split]))
            try channel.writeInbound(ByteBuffer(bytes: stream[split...]))
            #expect(try readAllFrames(channel) == expected, "split at \(split). \(random.replay)")
            #expect(try channel.finish().isClean, "split at \(split)")
        }
        // Three pieces, at every pair of boundaries around the first two frame headers.
        for first in 0...12 {
            for second in first...24 {
                let channel = decoderChannel()
                try channel.writeInbound(ByteBuffer(bytes: stream[..<first]))
                try channel.writeInbound(ByteBuffer(bytes: stream[first..<second]))
                try channel.writeInbound(ByteBuffer(bytes: stream[second...]))
                #expect(try readAllFrames(channel) == expected, "splits at \(first), \(second). \(random.replay)")
                #expect(try channel.finish().isClean)
            }
        }
    }

    @Test("large frames gathered across reads of any size decode to the same bytes")
    func largeFramesAcrossReads() throws {
        var random = SeededGenerator.fromEnvironment()
        for round in 0..<20 {
            let sizes = (0..<4).map { _ in
                Bool.random(using: &random)
                    ? Int.random(in: 1...FrameDecoder.assembledAbove, using: &random)
                    : Int.random(in: (FrameDecoder.assembledAbove + 1)...(400 << 10), using: &random)
            }
            let (stream, expected) = framedStream(sizes.map { random.bytes($0) })
            let channel = decoderChannel()
            var offset = 0
            while offset < stream.count {
                let end = min(stream.count, offset + Int.random(in: 1...(150 << 10), using: &random))
                try channel.writeInbound(ByteBuffer(bytes: stream[offset..<end]))
                offset = end
            }
            #expect(try readAllFrames(channel) == expected, "round \(round), sizes \(sizes). \(random.replay)")
            #expect(try channel.finish().isClean)
        }
    }

    @Test("a stream that ends inside a large frame being gathered is an error")
    func truncatedLargeFrame() throws {
        let (stream, _) = framedStream([[UInt8](repeating: 3, count: 200 << 10)])
        let channel = decoderChannel()
        try channel.writeInbound(ByteBuffer(bytes: stream[..<(100 << 10)]))
        try channel.writeInbound(ByteBuffer(bytes: stream[(100 << 10)..<(150 << 10)]))
        #expect(try readAllFrames(channel).isEmpty)
        let error = wireError { _ = try channel.finish() }
        #expect(error?.code == .malformedFrame)
        let detail = "a frame of \(200 << 10) bytes had only \((150 << 10) - 4) payload bytes"
        #expect(error?.message.contains(detail) == true)
    }

    @Test("a frame of exactly maxFrameBytes is accepted")
    func frameAtLimit() throws {
        let (stream, expected) = framedStream([[UInt8](repeating: 0xAB, count: 16)])
        let channel = decoderChannel(maxFrameBytes: 16)
        try channel.writeInbound(ByteBuffer(bytes: stream))
        #expect(try readAllFrames(channel) == expected)
        #expect(try channel.finish().isClean)
    }

    @Test(
        "an oversized length is rejected at the header, without waiting for the payload",
        arguments: [
            (16, UInt32(17)),
            (FrameDecoder.defaultMaxFrameBytes, UInt32(FrameDecoder.defaultMaxFrameBytes + 1)),
            (FrameDecoder.defaultMaxFrameBytes, UInt32.max),
        ]
    )
    func oversizedLengthRejectedAtHeader(maxFrameBytes: Int, length: UInt32) throws {
        let channel = decoderChannel(maxFrameBytes: maxFrameBytes)
        var header = ByteBuffer()
        header.writeInteger(length, endianness: .big)
        // Only the four header bytes arrive: the error must come now.
        let error = wireError { try channel.writeInbound(header) }
        #expect(error?.code == .frameTooLarge)
        #expect(error?.message.contains("\(length)") == true)
        #expect(error?.message.contains("\(maxFrameBytes)") == true)
        #expect(error?.code.closesConnection == true)
        #expect(try readAllFrames(channel).isEmpty)
        _ = try? channel.finish()
    }

    @Test("an oversized length is rejected after earlier good frames in the same write")
    func oversizedAfterGoodFrames() throws {
        let (good, expected) = framedStream([[1, 2, 3], [4]])
        let channel = decoderChannel(maxFrameBytes: 8)
        let error = wireError { try channel.writeInbound(ByteBuffer(bytes: good + [0, 0, 0, 9, 1, 2])) }
        #expect(error?.code == .frameTooLarge)
        #expect(try readAllFrames(channel) == expected)
        _ = try? channel.finish()
    }

    @Test("a zero-length frame is an error")
    func zeroLength() throws {
        let channel = decoderChannel()
        let error = wireError { try channel.writeInbound(ByteBuffer(bytes: [0, 0, 0, 0, 0x08, 0x01])) }
        #expect(error?.code == .malformedFrame)
        #expect(error?.message.contains("zero-length") == true)
        #expect(try readAllFrames(channel).isEmpty)
        _ = try? channel.finish()
    }

    @Test(
        "a stream that ends mid-frame is an error, not leftovers",
        arguments: [
            [UInt8](),  // nothing: clean
            [0, 0],  // half a header
            [0, 0, 0, 10],  // a header without payload
            [0, 0, 0, 10, 1, 2, 3],  // a header with part of the payload
        ]
    )
    func truncated(tail: [UInt8]) throws {
        let (good, expected) = framedStream([[9, 9]])
        let channel = decoderChannel()
        try channel.writeInbound(ByteBuffer(bytes: good + tail))
        #expect(try readAllFrames(channel) == expected)
        if tail.isEmpty {
            #expect(try channel.finish().isClean)
        } else {
            let error = wireError { _ = try channel.finish() }
            #expect(error?.code == .malformedFrame)
            #expect(error?.message.contains("ended inside a frame") == true)
        }
    }

    @Test("garbage bytes end in frames or a WireError, never a crash or a hang")
    func garbage() throws {
        var random = SeededGenerator.fromEnvironment()
        for round in 0..<500 {
            let channel = decoderChannel(maxFrameBytes: 1024)
            let garbage = random.bytes(Int.random(in: 1...2048, using: &random))
            do {
                try channel.writeInbound(ByteBuffer(bytes: garbage))
                for frame in try readAllFrames(channel) {
                    #expect(frame.readableBytes >= 1 && frame.readableBytes <= 1024)
                }
                _ = try channel.finish()
            } catch let error as WireError {
                #expect(
                    [.frameTooLarge, .malformedFrame].contains(error.code),
                    "round \(round): \(error). \(random.replay)"
                )
            } catch {
                Issue.record("round \(round): unexpected error \(error). \(random.replay)")
            }
        }
    }

    @Test("the frame writer fails the write of an empty or oversized payload and sends nothing")
    func writerLimits() throws {
        let channel = EmbeddedChannel(handler: FrameEncodingHandler(FrameEncoder(maxFrameBytes: 4)))
        for (payload, code) in [
            (ByteBuffer(), WireError.Code.malformedFrame), (ByteBuffer(bytes: [1, 2, 3, 4, 5]), .frameTooLarge),
        ] {
            #expect(wireError { try channel.writeOutbound(payload) }?.code == code)
            #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        }
        #expect(try channel.finish().isClean)
    }

    @Test("the encoder refuses empty and oversized payloads")
    func encoderLimits() throws {
        let encoder = FrameEncoder(maxFrameBytes: 4)
        var out = ByteBuffer()
        #expect(wireError { try encoder.encode(data: ByteBuffer(), out: &out) }?.code == .malformedFrame)
        #expect(
            wireError { try encoder.encode(data: ByteBuffer(bytes: [1, 2, 3, 4, 5]), out: &out) }?.code
                == .frameTooLarge
        )
        #expect(out.readableBytes == 0)
        try encoder.encode(data: ByteBuffer(bytes: [1, 2, 3, 4]), out: &out)
        #expect(out == ByteBuffer(bytes: [0, 0, 0, 4, 1, 2, 3, 4]))
    }
}

import ClusterWire
import NIOCore
import NIOEmbedded
import SwiftProtobuf
import Testing

@Suite("Envelope")
struct EnvelopeTests {
    @Test("the samples cover every body type")
    func samplesCoverEveryBody() {
        #expect(Set(envelopeSamples.map(\.body.name)) == allBodyNames)
        #expect(envelopeSamples.count == allBodyNames.count)
    }

    @Test(
        "every body type round-trips through a frame",
        arguments: envelopeSamples + [EnvelopeSample(body: syntheticPrefill)]
    )
    func roundTrip(sample: EnvelopeSample) throws {
        let envelope = Tessera_V1_Envelope(requestID: 0xFFFF_FFFF_FFFF_FFF0, sample.body)
        let frame = try envelope.serializedFrame()
        #expect(frame.readableBytes > 0)
        let decoded = try Tessera_V1_Envelope(frame: frame)
        #expect(decoded == envelope)
        #expect(try decoded.requiredBody == sample.body)
        #expect(decoded.bodyName == sample.body.name)
        // Deterministic: the same message gives the same bytes.
        #expect(try decoded.serializedFrame() == frame)
    }

    @Test("every body type round-trips through the channel pipeline (encoder, decoder, envelope codec)")
    func pipelineRoundTrip() throws {
        let sender = EmbeddedChannel()
        try sender.pipeline.syncOperations.addWireHandlers()
        let receiver = EmbeddedChannel()
        try receiver.pipeline.syncOperations.addWireHandlers()

        let envelopes = envelopeSamples.enumerated().map {
            Tessera_V1_Envelope(requestID: UInt64($0.offset), $0.element.body)
        }
        for envelope in envelopes {
            try sender.writeOutbound(envelope)
        }
        var wire = ByteBuffer()
        while var chunk = try sender.readOutbound(as: ByteBuffer.self) {
            wire.writeBuffer(&chunk)
        }
        // Deliver the whole stream in uneven pieces.
        var random = SeededGenerator.fromEnvironment()
        while wire.readableBytes > 0 {
            let piece = wire.readSlice(length: min(wire.readableBytes, Int.random(in: 1...700, using: &random)))!
            try receiver.writeInbound(piece)
        }
        var received: [Tessera_V1_Envelope] = []
        while let envelope = try receiver.readInbound(as: Tessera_V1_Envelope.self) {
            received.append(envelope)
        }
        #expect(received == envelopes, "\(random.replay)")
        #expect(try sender.finish().isClean)
        #expect(try receiver.finish().isClean)
    }

    @Test("the async testing channel yields envelopes and reports a malformed one as an error")
    func asyncChannel() async throws {
        let channel = try await NIOAsyncTestingChannel { channel in
            try channel.pipeline.syncOperations.addWireHandlers(maxFrameBytes: 1024)
        }
        let hello = Tessera_V1_Envelope(requestID: 1, envelopeSamples[0].body)
        var frame = ByteBuffer()
        var payload = try hello.serializedFrame()
        frame.writeInteger(UInt32(payload.readableBytes), endianness: .big)
        frame.writeBuffer(&payload)
        try await channel.writeInbound(frame)
        #expect(try await channel.readInbound(as: Tessera_V1_Envelope.self) == hello)

        // A well-framed payload that is not an Envelope: 0xFF... is a truncated varint tag.
        let error = await #expect(throws: WireError.self) {
            try await channel.writeInbound(ByteBuffer(bytes: [0, 0, 0, 3, 0xFF, 0xFF, 0xFF]))
        }
        #expect(error?.code == .malformedFrame)

        // An oversized header.
        let tooLarge = await #expect(throws: WireError.self) {
            try await channel.writeInbound(ByteBuffer(bytes: [0, 0, 0x04, 0x01]))
        }
        #expect(tooLarge?.code == .frameTooLarge)
        _ = try? await channel.finish()
    }

    @Test(
        "bytes that are not an Envelope give .malformedFrame naming the size",
        arguments: [
            [UInt8(0xFF), 0xFF, 0xFF],  // truncated varint tag
            [0x0F],  // field 1 with the invalid wire type 7
            [0x52, 0x10, 0x01],  // field 10 (hello), length 16, 1 byte present
            [0x08],  // request_id tag without its value
        ]
    )
    func malformedPayload(bytes: [UInt8]) {
        let error = wireError { _ = try Tessera_V1_Envelope(frame: ByteBuffer(bytes: bytes)) }
        #expect(error?.code == .malformedFrame)
        #expect(error?.message.contains("\(bytes.count) bytes") == true)
        #expect(error?.cause != nil)
    }

    @Test("random payloads parse or fail with .malformedFrame")
    func randomPayloads() {
        var random = SeededGenerator.fromEnvironment()
        for round in 0..<2000 {
            let bytes = random.bytes(Int.random(in: 1...64, using: &random))
            do {
                _ = try Tessera_V1_Envelope(frame: ByteBuffer(bytes: bytes))
            } catch {
                #expect(error.code == .malformedFrame, "round \(round), bytes \(bytes). \(random.replay)")
            }
        }
    }

    @Test("an envelope without a body (or with a body this build does not know) needs .badRequest")
    func missingOrUnknownBody() throws {
        var noBody = Tessera_V1_Envelope()
        noBody.requestID = 9
        let parsed = try Tessera_V1_Envelope(frame: noBody.serializedFrame())
        #expect(wireError { _ = try parsed.requiredBody }?.code == .badRequest)
        #expect(parsed.bodyName == "empty")

        // Field 99, length-delimited, 2 bytes: a body type from a newer peer.
        let future = try Tessera_V1_Envelope(frame: ByteBuffer(bytes: [0x08, 0x07, 0x9A, 0x06, 0x02, 0x08, 0x01]))
        #expect(future.requestID == 7)
        let error = wireError { _ = try future.requiredBody }
        #expect(error?.code == .badRequest)
        #expect(error?.message.contains("unknown") == true)
    }

    @Test("an error envelope carries the WireError")
    func errorEnvelope() throws {
        let original = WireError(.resourceExhausted, "cluster is at 95% of its cap", retryAfter: .milliseconds(1500))
        let frame = try Tessera_V1_Envelope(requestID: 3, error: original).serializedFrame()
        guard case .error(let proto) = try Tessera_V1_Envelope(frame: frame).requiredBody else {
            Issue.record("expected an error body")
            return
        }
        let received = WireError(proto: proto)
        #expect(received.code == .resourceExhausted)
        #expect(received.message == original.message)
        #expect(received.retryAfter == .milliseconds(1500))
    }
}

@Suite("WireError")
struct WireErrorTests {
    @Test("every code survives the proto round trip", arguments: WireError.Code.allCodes)
    func codeRoundTrip(code: WireError.Code) {
        #expect(WireError.Code(proto: code.proto) == code)
        #expect(code.proto.rawValue >= 1)
        #expect("\(code.proto)".lowercased() == code.description.filter { $0 != "_" }.lowercased())
    }

    @Test("the codes mirror every ErrorCode but UNSPECIFIED")
    func codesMirrorProto() {
        let protoCodes = Tessera_V1_ErrorCode.allCases.filter { $0 != .unspecified }
        #expect(Set(WireError.Code.allCodes.map(\.proto.rawValue)) == Set(protoCodes.map(\.rawValue)))
        #expect(WireError.Code.allCodes.count == protoCodes.count)
    }

    @Test("unspecified and unknown codes become .internal, naming the raw value")
    func unknownCodes() {
        var proto = Tessera_V1_Error()
        proto.message = "boom"
        proto.code = .unspecified
        #expect(WireError(proto: proto).code == .internal)
        proto.code = .UNRECOGNIZED(77)
        let error = WireError(proto: proto)
        #expect(error.code == .internal)
        #expect(error.message.contains("77"))
        #expect(error.message.contains("boom"))
    }

    @Test("retryAfter rounds up to whole milliseconds and clamps")
    func retryAfter() {
        #expect(WireError(.unavailable, "", retryAfter: .microseconds(1)).proto.retryAfterMillis == 1)
        #expect(WireError(.unavailable, "", retryAfter: .milliseconds(20)).proto.retryAfterMillis == 20)
        #expect(WireError(.unavailable, "", retryAfter: .seconds(1) + .nanoseconds(1)).proto.retryAfterMillis == 1001)
        #expect(WireError(.unavailable, "", retryAfter: .seconds(Int64.max)).proto.retryAfterMillis == UInt32.max)
        #expect(WireError(.unavailable, "", retryAfter: .zero).proto.retryAfterMillis == 0)
        #expect(WireError(.unavailable, "").proto.retryAfterMillis == 0)
        #expect(WireError(proto: WireError(.unavailable, "").proto).retryAfter == nil)
    }

    @Test("the description names code, message and cause")
    func description() {
        struct Inner: Error, CustomStringConvertible { var description: String { "inner" } }
        let error = WireError(.notPrimary, "worker-2 is primary of shard 3", cause: Inner())
        #expect(error.description == "NOT_PRIMARY: worker-2 is primary of shard 3 (cause: inner)")
    }
}

import ClusterWire
import KVCacheCore
import SwiftProtobuf
import Testing

private func span(
    _ kind: Tessera_V1_ModalityKind,
    _ index: UInt32,
    _ start: UInt32,
    _ count: UInt32
)
    -> Tessera_V1_ModalitySpan
{
    var message = Tessera_V1_ModalitySpan()
    message.kind = kind
    message.index = index
    message.start = start
    message.count = count
    return message
}

@Suite("Geometry, spans and scalar types <-> proto")
struct DomainConversionTests {
    // MARK: ModelGeometry

    @Test("every preset round-trips", arguments: ModelGeometry.presets)
    func geometryRoundTrip(geometry: ModelGeometry) throws {
        let message = try geometry.proto()
        #expect(message.name == geometry.name)
        #expect(message.queryHeads == UInt32(geometry.queryHeads))
        let bytes: [UInt8] = try message.serializedBytes()
        #expect(try ModelGeometry(proto: try Tessera_V1_ModelGeometry(serializedBytes: bytes)) == geometry)
    }

    @Test(
        "an invalid geometry is .invalidValue naming the field",
        arguments: [
            (UInt32(0), UInt32(4), UInt32(2), UInt32(32), UInt32(64), "layers must be in 1...512, got 0"),
            (6, 4, 0, 32, 64, "kvHeads must be in 1...256, got 0"),
            (6, 6, 4, 32, 64, "queryHeads (6) must be a positive multiple of kvHeads (4)"),
            (6, 4, 2, 2048, 64, "headDim must be in 1...1024, got 2048"),
            (6, 4, 2, 32, 0, "tokensPerImage must be in 1...16384, got 0"),
            (UInt32.max, 4, 2, 32, 64, "layers must be in 1...512, got \(UInt32.max)"),
        ]
    )
    func badGeometry(layers: UInt32, queryHeads: UInt32, kvHeads: UInt32, headDim: UInt32, tokens: UInt32, text: String)
    {
        var message = try! ModelGeometry.tiny.proto()
        message.layers = layers
        message.queryHeads = queryHeads
        message.kvHeads = kvHeads
        message.headDim = headDim
        message.tokensPerImage = tokens
        let error = wireError { _ = try ModelGeometry(proto: message) }
        #expect(error?.code == .invalidValue)
        #expect(error?.message == "model: model 'tiny': \(text)", "\(error?.message ?? "")")
        #expect(error?.cause is KVCacheError)
    }

    @Test("encoding a geometry changed into an invalid one throws")
    func encodeBadGeometry() {
        var geometry = ModelGeometry.tiny
        geometry.kvHeads = 3
        let error = wireError { _ = try geometry.proto() }
        #expect(error?.code == .invalidValue)
        #expect(error?.message.contains("queryHeads (4) must be a positive multiple of kvHeads (3)") == true)
    }

    // MARK: Spans and layouts

    static let spans: [ModalitySpan] = [
        ModalitySpan(.text, start: 0, count: 5),
        ModalitySpan(.image(0), start: 5, count: 64),
        ModalitySpan(.videoFrame(3), start: 69, count: 64),
        ModalitySpan(.image(ModalitySpan.maxWireIndex), start: 133, count: 1),
        ModalitySpan(.text, start: 134, count: 7),
    ]

    @Test("spans and layouts round-trip")
    func spansRoundTrip() throws {
        let layout = try PromptLayout(spans: Self.spans)
        let messages = try layout.proto()
        #expect(messages.map(\.kind) == [.text, .image, .videoFrame, .image, .text])
        #expect(messages.map(\.index) == [0, 0, 3, UInt32(ModalitySpan.maxWireIndex), 0])
        #expect(messages.map(\.start) == [0, 5, 69, 133, 134])
        #expect(messages.map(\.count) == [5, 64, 64, 1, 7])

        let decoded = try PromptLayout(proto: messages)
        #expect(decoded == layout)
        #expect(decoded.promptLength == 141)
        #expect(try [ModalitySpan](proto: messages) == Self.spans)
        #expect(try Self.spans.proto() == messages)
    }

    @Test("a gap, an overlap or a late first span is .invalidShape naming the span")
    func notTiling() {
        var gap = try! Self.spans.proto()
        gap[2].start = 70
        let gapError = wireError { _ = try PromptLayout(proto: gap) }
        #expect(gapError?.code == .invalidShape)
        #expect(
            gapError?.message == "spans[2].start must be 69 (spans must tile 0..<promptLength in order, without gaps "
                + "or overlaps), got 70",
            "\(gapError?.message ?? "")"
        )

        var overlap = try! Self.spans.proto()
        overlap[1].start = 4
        #expect(wireError { _ = try PromptLayout(proto: overlap) }?.code == .invalidShape)

        let late = [span(.text, 0, 1, 4)]
        let lateError = wireError { _ = try [ModalitySpan](proto: late) }
        #expect(lateError?.code == .invalidShape)
        #expect(lateError?.message.contains("spans[0].start must be 0") == true)

        let empty = wireError { _ = try PromptLayout(proto: []) }
        #expect(empty?.code == .invalidShape)
        #expect(empty?.message == "spans must hold at least one span, got none")

        // The same checks on the sending side.
        var spans = Self.spans
        spans[1].start = 6
        #expect(wireError { _ = try spans.proto() }?.code == .invalidShape)
        #expect(wireError { _ = try [ModalitySpan]().proto() }?.code == .invalidShape)
    }

    @Test("UNSPECIFIED and unknown kinds are .invalidValue", arguments: [0, 4, 99])
    func badKind(raw: Int) {
        let spans = [span(.text, 0, 0, 3), span(Tessera_V1_ModalityKind(rawValue: raw)!, 0, 3, 2)]
        let error = wireError { _ = try PromptLayout(proto: spans) }
        #expect(error?.code == .invalidValue)
        let got = raw == 0 ? "UNSPECIFIED (0)" : "\(raw)"
        #expect(
            error?.message == "spans[1].kind must be TEXT (1), IMAGE (2) or VIDEO_FRAME (3), got \(got)",
            "\(error?.message ?? "")"
        )
    }

    @Test("a span with count 0, a text index or an index past 30 bits is rejected")
    func badSpanFields() {
        let zero = wireError { _ = try PromptLayout(proto: [span(.text, 0, 0, 3), span(.image, 0, 3, 0)]) }
        #expect(zero?.code == .invalidShape)
        #expect(zero?.message == "spans[1].count must be at least 1, got 0")

        let textIndex = wireError { _ = try PromptLayout(proto: [span(.text, 2, 0, 3)]) }
        #expect(textIndex?.code == .invalidValue)
        #expect(textIndex?.message == "spans[0].index must be 0 for a TEXT span, got 2")

        let bigIndex = wireError { _ = try PromptLayout(proto: [span(.videoFrame, 1 << 30, 0, 3)]) }
        #expect(bigIndex?.code == .invalidValue)
        #expect(bigIndex?.message == "spans[0].index must be in 0...\((1 << 30) - 1), got \(1 << 30)")

        let encodeIndex = wireError { _ = try ModalitySpan(.image(-1), start: 0, count: 1).proto() }
        #expect(encodeIndex?.code == .invalidValue)
        let encodeCount = wireError { _ = try ModalitySpan(.text, start: 0, count: 0).proto() }
        #expect(encodeCount?.code == .invalidShape)
        let encodeStart = wireError { _ = try ModalitySpan(.text, start: -1, count: 2).proto() }
        #expect(encodeStart?.code == .invalidValue)
    }

    @Test("a prompt longer than the limit is refused before its tags are allocated")
    func tooLong() {
        let huge = [span(.text, 0, 0, UInt32.max)]
        let error = wireError { _ = try PromptLayout(proto: huge) }
        #expect(error?.code == .invalidShape)
        #expect(
            error?.message == "spans: the prompt must be at most \(PromptLayout.defaultMaxWirePromptLength) positions "
                + "long, spans[0] ends at \(UInt32.max)",
            "\(error?.message ?? "")"
        )
        #expect(wireError { _ = try PromptLayout(proto: [span(.text, 0, 0, 11)], maxPromptLength: 10) } != nil)
        #expect((try? PromptLayout(proto: [span(.text, 0, 0, 10)], maxPromptLength: 10))?.promptLength == 10)
    }

    // MARK: ScalarType

    @Test("scalar types round-trip", arguments: ScalarType.allCases)
    func scalarRoundTrip(scalar: ScalarType) throws {
        #expect(try ScalarType(proto: scalar.proto) == scalar)
        #expect(ScalarType(scalar.wire) == scalar)
        #expect(scalar.wire.byteWidth == scalar.byteWidth)
    }

    @Test("UNSPECIFIED and unknown scalar types are .invalidValue", arguments: [0, 3, 42])
    func badScalar(raw: Int) {
        let error = wireError { _ = try ScalarType(proto: Tessera_V1_ScalarType(rawValue: raw)!, field: "keys.dtype") }
        #expect(error?.code == .invalidValue)
        let got = raw == 0 ? "UNSPECIFIED (0)" : "\(raw)"
        #expect(error?.message == "keys.dtype must be FLOAT32 (1) or FLOAT16 (2), got \(got)")
    }

    @Test("core errors map to wire codes")
    func coreErrorMapping() {
        let cases: [(KVCacheError.Code, WireError.Code)] = [
            (.invalidShape, .invalidShape), (.unknownName, .badRequest), (.invalidGeometry, .invalidValue),
            (.invalidValue, .invalidValue), (.invalidBudget, .invalidValue), (.invalidSetting, .invalidValue),
        ]
        for (core, wire) in cases {
            let error = WireError(KVCacheError(core, "what"), field: "f")
            #expect(error.code == wire)
            #expect(error.message == "f: what")
        }
    }
}

import ClusterWire
import KVCacheCore
import NIOCore
import SwiftProtobuf
import Testing

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A frame's payload as a buffer of its own, as `FrameDecoder` hands it over.
private func frame(_ envelope: Tessera_V1_Envelope) throws -> ByteBuffer {
    try envelope.serializedFrame()
}

/// What swift-protobuf makes of the same bytes: the reference the frame decoder must equal.
private func reference(_ bytes: ByteBuffer) -> Tessera_V1_Envelope? {
    try? Tessera_V1_Envelope(serializedBytes: Array(bytes.readableBytesView))
}

/// The envelope's deterministic encoding, which compares NaN payloads bit for bit.
private func canonical(_ envelope: Tessera_V1_Envelope) throws -> [UInt8] {
    Array(try frame(envelope).readableBytesView)
}

/// A prefill of three layers of the tiny model: float32 and float16 tensors, one layer without
/// queries.
private func prefill(_ random: inout SeededGenerator, promptLength m: Int = 40) throws -> Tessera_V1_Envelope {
    let g = ModelGeometry.tiny
    var inline = Tessera_V1_InlineTensors()
    for layer in 0..<3 {
        let rows = layer == 1 ? 0 : min(8, m)
        let prefill = try random.prefill(geometry: g, promptLength: m, queryRows: rows)
        inline.layers.append(try prefill.proto(layer: layer, scalarType: layer == 2 ? .float16 : .float32))
    }
    var message = Tessera_V1_Prefill()
    message.tenant = "acme"
    message.sequenceID = 9
    message.epoch = 3
    message.source = .inlineTensors(inline)
    message.audit = true
    return Tessera_V1_Envelope(requestID: 17, .prefill(message))
}

/// A shard copy's layer part: two heads of float16 rows with their positions.
private func shardLayer(_ random: inout SeededGenerator) throws -> Tessera_V1_Envelope {
    var part = Tessera_V1_ShardLayerState()
    part.layer = 4
    for _ in 0..<2 {
        var head = Tessera_V1_HeadState()
        head.keys = try Tessera_V1_Tensor(float16Converting: random.floats(24 * 32), shape: [24, 32])
        head.values = try Tessera_V1_Tensor(float16Converting: random.floats(24 * 32), shape: [24, 32])
        head.positions = (0..<24).map { Int32($0 * 3) }
        head.rowScores = random.floats(24)
        part.heads.append(head)
    }
    var transfer = Tessera_V1_ShardTransfer()
    transfer.sequenceID = 9
    transfer.layer = part
    return Tessera_V1_Envelope(requestID: 4, .shardTransfer(transfer))
}

/// Whether `data`'s bytes lie inside `frame`'s (the decoder kept them where they arrived).
private func refers(_ data: Data, into frame: ByteBuffer) -> Bool {
    frame.withUnsafeReadableBytes { frameBytes in
        data.withUnsafeBytes { bytes in
            guard let start = bytes.baseAddress, let frameStart = frameBytes.baseAddress else { return false }
            return start >= frameStart && start + bytes.count <= frameStart + frameBytes.count
        }
    }
}

/// Appends a length-delimited field to `bytes` with its length written in at least `lengthBytes`
/// bytes (a longer encoding than needed is still valid protobuf).
private func appendField(_ number: Int, _ contents: [UInt8], lengthBytes: Int = 1, to bytes: inout [UInt8]) {
    bytes.append(UInt8(truncatingIfNeeded: number << 3 | 2))
    if number >= 16 {
        bytes[bytes.count - 1] |= 0x80
        bytes.append(UInt8(number >> 4))
    }
    var length = contents.count
    let needed = max(1, (Int.bitWidth - length.leadingZeroBitCount + 6) / 7)
    let lengthBytes = max(lengthBytes, needed)
    for index in 0..<lengthBytes {
        bytes.append(UInt8(length & 0x7f) | (index == lengthBytes - 1 ? 0 : 0x80))
        length >>= 7
    }
    bytes += contents
}

@Suite("Frames decoded without copying their tensors")
struct FrameTensorsTests {
    @Test("a prefill and a shard copy decode as swift-protobuf decodes them, their tensors left in the frame")
    func zeroCopy() throws {
        var random = SeededGenerator.fromEnvironment()
        for envelope in [try prefill(&random), try shardLayer(&random)] {
            let bytes = try frame(envelope)
            let decoded = try Tessera_V1_Envelope(frame: bytes)
            #expect(decoded == envelope, "\(random.replay)")
            #expect(decoded == reference(bytes))
            var tensors: [Tessera_V1_Tensor] = []
            if case .prefill(let prefill) = decoded.body {
                for layer in prefill.inlineTensors.layers {
                    tensors += [layer.keys, layer.values] + (layer.hasQueries ? [layer.queries] : [])
                }
            }
            if case .shardTransfer(let transfer) = decoded.body {
                for head in transfer.layer.heads { tensors += [head.keys, head.values] }
            }
            #expect(tensors.count == (envelope.bodyName == "prefill" ? 8 : 4))
            for tensor in tensors {
                #expect(refers(tensor.data, into: bytes), "a tensor of \(envelope.bodyName) was copied")
            }
        }
    }

    @Test("tensors read from the frame convert to the same prefill as from the message sent")
    func conversionFromTheFrame() throws {
        var random = SeededGenerator.fromEnvironment()
        let envelope = try prefill(&random)
        let decoded = try Tessera_V1_Envelope(frame: try frame(envelope))
        guard case .prefill(let sent) = envelope.body, case .prefill(let received) = decoded.body else {
            Issue.record("not a prefill")
            return
        }
        for (original, layer) in zip(sent.inlineTensors.layers, received.inlineTensors.layers) {
            let a = try LayerPrefill(proto: original, geometry: .tiny, promptLength: 40)
            let b = try LayerPrefill(proto: layer, geometry: .tiny, promptLength: 40)
            #expect(a.keys == b.keys && a.values == b.values && a.queries == b.queries, "\(random.replay)")
        }
    }

    /// Encodings no encoder of ours writes but protobuf allows: the decoder must follow protobuf's
    /// rules (repeated singular fields merge, the last oneof member wins, unknown fields are kept,
    /// lengths may be written longer than needed) exactly as swift-protobuf does.
    @Test("unusual but valid encodings decode as swift-protobuf decodes them")
    func protobufRules() throws {
        var random = SeededGenerator.fromEnvironment()
        let tensor = try Tessera_V1_Tensor(float32: random.floats(64), shape: [2, 1, 32])
        let tensorBytes: [UInt8] = try tensor.serializedBytes()
        var layer: [UInt8] = [0x08, 0x02]  // layer 2
        appendField(2, tensorBytes, lengthBytes: 3, to: &layer)  // keys, length padded
        appendField(2, tensorBytes, to: &layer)  // keys again: merged, its data replaces the first's
        appendField(3, tensorBytes, to: &layer)
        appendField(15, [1, 2, 3], to: &layer)  // an unknown field
        var inline: [UInt8] = []
        appendField(1, layer, lengthBytes: 2, to: &inline)
        appendField(1, layer, to: &inline)
        var prefill: [UInt8] = [0x10, 0x07]  // sequence 7
        appendField(10, inline, lengthBytes: 4, to: &prefill)
        var variants: [[UInt8]] = []
        var plain: [UInt8] = [0x08, 0x05]
        appendField(50, prefill, to: &plain)
        variants.append(plain)
        var twice = plain
        appendField(50, prefill, lengthBytes: 5, to: &twice)  // the prefill merged with itself
        variants.append(twice)
        var replaced = plain
        appendField(52, [0x10, 0x01], to: &replaced)  // a decode after it: the last body wins
        variants.append(replaced)
        var empty: [UInt8] = [0x08, 0x01]
        appendField(3, [], to: &empty)  // a tensor with empty data
        var emptyLayer: [UInt8] = []
        appendField(2, empty, to: &emptyLayer)
        var emptyInline: [UInt8] = []
        appendField(1, emptyLayer, to: &emptyInline)
        var emptyPrefill: [UInt8] = []
        appendField(10, emptyInline, to: &emptyPrefill)
        var withEmpty: [UInt8] = []
        appendField(50, emptyPrefill, to: &withEmpty)
        variants.append(withEmpty)
        for (index, bytes) in variants.enumerated() {
            let buffer = ByteBuffer(bytes: bytes)
            let expected = try #require(reference(buffer), "variant \(index)")
            #expect(try Tessera_V1_Envelope(frame: buffer) == expected, "variant \(index), \(random.replay)")
        }
    }

    @Test("damaged frames are decoded, or refused, as swift-protobuf decodes or refuses them")
    func damagedFrames() throws {
        var random = SeededGenerator.fromEnvironment()
        let original =
            Array(try frame(try prefill(&random, promptLength: 3)).readableBytesView)
            + Array(try frame(try shardLayer(&random)).readableBytesView)
        var refused = 0
        for _ in 0..<3000 {
            var bytes = original
            for _ in 0..<Int.random(in: 1...4, using: &random) {
                let at = Int.random(in: 0..<bytes.count, using: &random)
                switch Int.random(in: 0..<3, using: &random) {
                case 0: bytes[at] = UInt8.random(in: 0...255, using: &random)
                case 1: bytes.removeSubrange(at...)
                default: bytes.insert(UInt8.random(in: 0...255, using: &random), at: at)
                }
                if bytes.isEmpty { bytes = [0] }
            }
            let buffer = ByteBuffer(bytes: bytes)
            let expected = reference(buffer)
            let decoded = try? Tessera_V1_Envelope(frame: buffer)
            // Compared as bytes: damage can turn a float into NaN, which `==` never equals.
            #expect(try decoded.map(canonical) == expected.map(canonical), "\(random.replay)")
            if expected == nil { refused += 1 }
        }
        #expect(refused > 0 && refused < 3000, "the damage should make some frames invalid and leave others valid")
    }

    /// Bad tensors in a frame decoded without copies are refused with the same errors as before,
    /// element positions included.
    @Test("bad tensors read from the frame: byte count, non-finite values, overflowing shapes")
    func badTensors() throws {
        var random = SeededGenerator.fromEnvironment()
        let g = ModelGeometry.tiny
        let m = 70
        func refusal(_ edit: (inout Tessera_V1_LayerTensors) -> Void) throws -> WireError? {
            let good = try random.prefill(geometry: g, promptLength: m, queryRows: 0)
            var layer = try good.proto(layer: 0)
            edit(&layer)
            var prefill = Tessera_V1_Prefill()
            prefill.inlineTensors.layers = [layer]
            let decoded = try Tessera_V1_Envelope(
                frame: try frame(Tessera_V1_Envelope(requestID: 1, .prefill(prefill)))
            )
            guard case .prefill(let received) = decoded.body else { return nil }
            do {
                _ = try LayerPrefill(proto: received.inlineTensors.layers[0], geometry: g, promptLength: m)
                return nil
            } catch {
                return error
            }
        }
        func poison(_ tensor: inout Tessera_V1_Tensor, at index: Int, _ value: Float) {
            withUnsafeBytes(of: value.bitPattern.littleEndian) {
                tensor.data.replaceSubrange(index * 4..<index * 4 + 4, with: $0)
            }
        }
        let short = try refusal { $0.keys.data.removeLast(4) }
        #expect(short?.code == .invalidShape)
        #expect(
            short?.message.contains("needs 17920 bytes, got 17916") == true,
            "\(short.map { "\($0)" } ?? "accepted")"
        )
        for (index, value, word) in [
            (0, Float.nan, "NaN"), (64, .infinity, "infinity"), (4479, -.infinity, "-infinity"),
        ] {
            let error = try refusal { poison(&$0.values, at: index, value) }
            #expect(error?.code == .invalidValue, "element \(index)")
            #expect(error?.message.contains("layer 0 values: element") == true)
            #expect(
                error?.message.contains("(flat \(index)) is \(word)") == true,
                "\(error.map { "\($0)" } ?? "accepted")"
            )
        }
        let halfInfinity = try refusal { layer in
            layer.keys = try! Tessera_V1_Tensor(
                float16Converting: Array(repeating: 1, count: g.kvHeads * m * g.headDim),
                shape: [g.kvHeads, m, g.headDim]
            )
            layer.keys.data.replaceSubrange(200..<202, with: [0x00, 0x7c])  // element 100: +infinity
        }
        #expect(halfInfinity?.code == .invalidValue)
        #expect(halfInfinity?.message.contains("(flat 100) is infinity") == true)
        let huge = try refusal { $0.keys.shape = [UInt32.max, UInt32.max, UInt32.max] }
        #expect(huge?.code == .invalidShape)
    }
}

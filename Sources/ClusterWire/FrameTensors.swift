internal import NIOCore
internal import SwiftProtobuf

#if canImport(FoundationEssentials)
internal import FoundationEssentials
#else
internal import Foundation
#endif

/// Decoding a frame without copying the tensor bytes it carries.
///
/// swift-protobuf copies every `bytes` field it parses into a new `Data`: for a prefill or a shard
/// copy, that is the whole frame once more. So before swift-protobuf sees a frame whose envelope
/// carries tensors, their `Tensor.data` fields are cut out: everything else is copied into a small
/// new buffer, each enclosing length rewritten, with a stand-in in place of each data field that
/// names it by index. Once that is parsed, each stand-in is replaced by a `Data` that refers to the
/// frame's own bytes (and keeps them alive). The receiver then reads each tensor once, straight from
/// the frame into its storage, checking it on the way (`Tessera_V1_Tensor.floatValues`).
///
/// Nothing changes on the wire: frames are plain protobuf, as any language's client writes them,
/// and the message decoded here equals swift-protobuf's own decoding of the same frame (a test and
/// the fuzzer compare the two). A frame the cut does not understand (a group, a length past its
/// end) goes to swift-protobuf as it is, which then reports what is wrong with it.
enum FrameTensors {
    /// The fields, by number, that lead from a message to `Tensor` messages.
    indirect enum Path {
        case tensor
        case message([UInt64: Path])
    }

    /// `Tensor.data`.
    static let dataField: UInt64 = 3

    /// Inline prefills (`prefill.inline_tensors.layers[].{keys,values,queries}`) and shard copies
    /// (`shard_transfer.layer.heads[].{keys,values}`): the messages whose tensors are large.
    static let envelope = Path.message([
        50: .message([10: .message([1: .message([2: .tensor, 3: .tensor, 4: .tensor])])]),
        62: .message([3: .message([2: .message([1: .tensor, 2: .tensor])])]),
    ])

    /// The envelope in `frame` with its tensors' data referring to the frame's bytes, or nil when it
    /// carries none on the paths above (or cannot be cut): then decode the frame as it is.
    static func decode(_ frame: ByteBuffer) throws -> Tessera_V1_Envelope? {
        try frame.withUnsafeReadableBytesWithStorageManagement { bytes, storage in
            var cutter = Cutter(bytes: bytes)
            guard let skeleton = cutter.cut(), !cutter.payloads.isEmpty else { return nil }
            let payloads = cutter.payloads.map { range in
                _ = storage.retain()
                return Data(
                    bytesNoCopy: UnsafeMutableRawPointer(mutating: bytes.baseAddress! + range.lowerBound),
                    count: range.count,
                    deallocator: .custom { _, _ in storage.release() }
                )
            }
            var envelope = try Tessera_V1_Envelope(serializedBytes: skeleton)
            try envelope.restoreTensors(payloads)
            return envelope
        }
    }

    /// The stand-in for payload `index`: eight bytes, little-endian. Real data is never left in a
    /// cut frame (every non-empty data field on the paths is cut), so any data found there after
    /// parsing is a stand-in.
    static func standIn(_ index: Int) -> [UInt8] {
        withUnsafeBytes(of: UInt64(index).littleEndian) { Array($0) }
    }

    /// Copies a serialized message, cutting out the data of the tensors `Path` leads to.
    private struct Cutter {
        let bytes: UnsafeRawBufferPointer
        /// Where each cut data field's contents lie in `bytes`, in the order met.
        var payloads: [Range<Int>] = []

        init(bytes: UnsafeRawBufferPointer) {
            self.bytes = bytes
        }

        /// The skeleton of the whole buffer, or nil when it leads to no tensor or cannot be cut.
        mutating func cut() -> [UInt8]? {
            // Most frames carry no tensors: their top-level fields say so before anything is copied.
            guard case .message(let top) = FrameTensors.envelope, (try? self.mentions(top)) == true else { return nil }
            var skeleton: [UInt8] = []
            guard (try? self.copy(0..<bytes.count, along: FrameTensors.envelope, into: &skeleton)) == true else {
                return nil
            }
            return skeleton
        }

        /// Whether a top-level field of the buffer is one of `fields`, length-delimited.
        private func mentions(_ fields: [UInt64: Path]) throws(Uncuttable) -> Bool {
            var position = 0
            while position < bytes.count {
                let field = try self.field(at: position, end: bytes.count)
                if field.contents != nil, fields[field.number] != nil { return true }
                position = field.end
            }
            return false
        }

        /// Appends the message in `range` to `out`, recursing into the fields `path` names. Returns
        /// whether it met any of them.
        private mutating func copy(
            _ range: Range<Int>,
            along path: Path,
            into out: inout [UInt8]
        ) throws(Uncuttable)
            -> Bool
        {
            var position = range.lowerBound
            var met = false
            while position < range.upperBound {
                let field = try self.field(at: position, end: range.upperBound)
                position = field.end
                if let contents = field.contents {
                    switch path {
                    case .message(let fields):
                        if let next = fields[field.number] {
                            var inner: [UInt8] = []
                            if try self.copy(contents, along: next, into: &inner) {
                                met = true
                                self.append(field.start..<field.lengthStart, to: &out)
                                Self.appendVarint(UInt64(inner.count), to: &out)
                                out += inner
                                continue
                            }
                        }
                    case .tensor:
                        if field.number == FrameTensors.dataField, !contents.isEmpty {
                            met = true
                            self.append(field.start..<field.lengthStart, to: &out)
                            let standIn = FrameTensors.standIn(payloads.count)
                            Self.appendVarint(UInt64(standIn.count), to: &out)
                            out += standIn
                            payloads.append(contents)
                            continue
                        }
                    }
                }
                self.append(field.start..<field.end, to: &out)
            }
            return met
        }

        /// One field of a serialized message: where it starts and ends, and for a length-delimited
        /// one, where its length and its contents lie.
        private struct Field {
            var number: UInt64
            var start: Int
            var lengthStart: Int
            var contents: Range<Int>?
            var end: Int
        }

        private func field(at start: Int, end: Int) throws(Uncuttable) -> Field {
            var position = start
            let tag = try self.varint(at: &position, end: end)
            let lengthStart = position
            var contents: Range<Int>?
            switch tag & 7 {
            case 0: _ = try self.varint(at: &position, end: end)
            case 1: position += 8
            case 5: position += 4
            case 2:
                let length = try self.varint(at: &position, end: end)
                guard length <= UInt64(end - position) else { throw Uncuttable() }
                contents = position..<(position + Int(length))
                position += Int(length)
            default: throw Uncuttable()  // groups (deprecated, never written by this protocol) or garbage
            }
            guard position <= end else { throw Uncuttable() }
            return Field(number: tag >> 3, start: start, lengthStart: lengthStart, contents: contents, end: position)
        }

        private func append(_ range: Range<Int>, to out: inout [UInt8]) {
            out.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[range]))
        }

        private func varint(at position: inout Int, end: Int) throws(Uncuttable) -> UInt64 {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while position < end, shift < 64 {
                let byte = bytes[position]
                position += 1
                value |= UInt64(byte & 0x7f) << shift
                if byte < 0x80 { return value }
                shift += 7
            }
            throw Uncuttable()
        }

        private static func appendVarint(_ value: UInt64, to out: inout [UInt8]) {
            var rest = value
            while rest >= 0x80 {
                out.append(UInt8(truncatingIfNeeded: rest) | 0x80)
                rest >>= 7
            }
            out.append(UInt8(rest))
        }
    }

    private struct Uncuttable: Error {}
}

extension Tessera_V1_Envelope {
    /// Replaces the stand-ins a cut frame's tensors hold by the data they name.
    fileprivate mutating func restoreTensors(_ payloads: [Data]) throws(WireError) {
        switch self.body {
        case .prefill(var prefill):
            guard case .inlineTensors(var inline) = prefill.source else { return }
            for index in inline.layers.indices {
                if inline.layers[index].hasKeys { try inline.layers[index].keys.restore(payloads) }
                if inline.layers[index].hasValues { try inline.layers[index].values.restore(payloads) }
                if inline.layers[index].hasQueries { try inline.layers[index].queries.restore(payloads) }
            }
            prefill.source = .inlineTensors(inline)
            self.body = .prefill(prefill)
        case .shardTransfer(var transfer):
            guard case .layer(var layer) = transfer.part else { return }
            for index in layer.heads.indices {
                if layer.heads[index].hasKeys { try layer.heads[index].keys.restore(payloads) }
                if layer.heads[index].hasValues { try layer.heads[index].values.restore(payloads) }
            }
            transfer.part = .layer(layer)
            self.body = .shardTransfer(transfer)
        default:
            return
        }
    }
}

extension Tessera_V1_Tensor {
    fileprivate mutating func restore(_ payloads: [Data]) throws(WireError) {
        guard !self.data.isEmpty else { return }
        guard self.data.count == 8 else { throw Self.lostTrack }
        let index = self.data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard index < UInt64(payloads.count) else { throw Self.lostTrack }
        self.data = payloads[Int(index)]
    }

    /// Cannot happen for a skeleton the cutter wrote; a guard, not an answer to any input.
    private static let lostTrack = WireError(.internal, "a tensor of a decoded frame lost track of its bytes")
}

import KVCacheCore
import Testing

@testable import Workloads

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Seeded random draws for the mutation test.
private struct Seeded: RandomNumberGenerator {
    var mix: SplitMix64
    mutating func next() -> UInt64 { mix.next() }
}

/// Trace files: a generated trace written as safetensors reads back bit for bit, and every kind of
/// damaged or inconsistent file is refused with a message naming the file and what was wrong.
@Suite struct TraceFileTests {
    static func temporaryPath(_ name: String) -> String {
        "\(FileManager.default.temporaryDirectory.path)/tessera-\(ProcessInfo.processInfo.processIdentifier)-\(name)"
    }

    static func written(
        _ trace: SequenceTrace,
        dtype: SafeTensors.DType = .f32,
        queryRows: Int? = nil
    ) throws -> SafeTensors {
        let path = temporaryPath("trace-\(trace.seed)-\(dtype.rawValue).safetensors")
        defer { try? FileManager.default.removeItem(atPath: path) }
        try TraceFile.write(trace, queryRows: queryRows, as: dtype, to: path)
        return try SafeTensors(contentsOf: path)
    }

    @Test(arguments: [WorkloadPreset.imageQA, .video])
    func aGeneratedTraceReadsBackBitForBit(preset: WorkloadPreset) throws {
        let seed: UInt64 = 11
        let trace = TraceGenerator(preset: preset, geometry: .tiny, seed: seed).sequence(0)
        let file = try TraceFile(try Self.written(trace))
        #expect(file.geometry == trace.geometry && file.layout == trace.layout, "seed \(seed)")
        #expect(file.decodeSteps == trace.decodeSteps && file.needle == trace.needle, "seed \(seed)")
        for layer in [0, trace.geometry.layers - 1] {
            let (want, got) = (trace.prefill(layer: layer), try file.prefill(layer: layer))
            #expect(got.keys == want.keys && got.values == want.values && got.queries == want.queries, "seed \(seed)")
            let (steps, read) = (trace.decode(layer: layer), try file.decode(layer: layer))
            #expect(
                read.map(\.keys) == steps.map(\.keys) && read.map(\.queries) == steps.map(\.queries),
                "seed \(seed)"
            )
            #expect(read.map(\.values) == steps.map(\.values), "seed \(seed)")
        }
    }

    @Test func halfPrecisionAndFewerQueryRowsAreReadAsWritten() throws {
        let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: 12).sequence(0)
        for dtype in [SafeTensors.DType.f16, .bf16] {
            let file = try TraceFile(try Self.written(trace, dtype: dtype, queryRows: 8))
            #expect(file.queryRows == 8)
            let (want, got) = (trace.prefill(layer: 1), try file.prefill(layer: 1))
            let error = zip(want.keys.joined(), got.keys.joined()).map { abs($0 - $1) / max(1, abs($0)) }.max() ?? 0
            #expect(error < (dtype == .f16 ? 1e-3 : 1e-2), "\(dtype): largest relative error \(error)")
            #expect(got.queries.count == trace.geometry.queryHeads * 8 * trace.geometry.headDim)
        }
    }

    /// A non-finite element is refused when its tensor is read, naming the element, in every dtype
    /// (each dtype through its own checked copy).
    @Test(arguments: [
        (SafeTensors.DType.f32, [0, 0, 0x80, 0x3F, 0, 0, 0xC0, 0x7F] as [UInt8], "element 1 is nan"),
        (.f16, [0x00, 0x3C, 0x00, 0x7C], "element 1 is inf"),
        (.bf16, [0x80, 0x3F, 0x80, 0xFF], "element 1 is -inf"),
    ])
    func aNonFiniteElementIsRefusedWhenRead(dtype: SafeTensors.DType, data: [UInt8], expected: String) throws {
        let header = #"{"a": {"dtype": "\#(dtype.rawValue)", "shape": [2], "data_offsets": [0, \#(data.count)]}}"#
        let file = try SafeTensors(bytes: Self.file(header: header, data: data), file: "bad.safetensors")
        #expect {
            _ = try file.floats("a", shape: [2])
        } throws: { error in
            "\(error)" == "bad.safetensors: tensor a \(expected); every element must be finite"
        }
    }

    /// BF16 is the top half of a Float32: widened, it is that Float32 exactly.
    @Test func bfloat16IsWidenedExactly() throws {
        let values: [Float] = [1, -3.140625, 0x1p-130, -0, 3.3895314e38]
        let data = values.flatMap { value in
            let top = UInt16(value.bitPattern >> 16)
            return [UInt8(truncatingIfNeeded: top), UInt8(top >> 8)]
        }
        let header = #"{"a": {"dtype": "BF16", "shape": [5], "data_offsets": [0, 10]}}"#
        let file = try SafeTensors(bytes: Self.file(header: header, data: data), file: "b.safetensors")
        let read = try file.floats("a", shape: [5])
        #expect(read.map(\.bitPattern) == values.map(\.bitPattern))
    }

    /// A file's bytes with the header replaced by `header`.
    static func file(header: String, data: [UInt8] = []) -> [UInt8] {
        let bytes = Array(header.utf8)
        return (0..<8).map { UInt8(truncatingIfNeeded: UInt64(bytes.count) >> (8 * $0)) } + bytes + data
    }

    @Test(arguments: [
        ([UInt8](repeating: 0, count: 5), "too short"),
        ([255, 255, 255, 255, 0, 0, 0, 0] + [UInt8](repeating: 32, count: 8), "header length"),
        (Self.file(header: "[1, 2]"), "not a JSON object"),
        (
            Self.file(
                header: #"{"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}"#,
                data: [UInt8](repeating: 0, count: 8)
            ), "dtype F64"
        ),
        (
            Self.file(
                header: #"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#,
                data: [UInt8](repeating: 0, count: 4)
            ), "data's size"
        ),
        (
            Self.file(
                header: #"{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#,
                data: [UInt8](repeating: 0, count: 8)
            ), "holds 8 bytes"
        ),
        (
            Self.file(
                header: #"{"a": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 8]}}"#,
                data: [UInt8](repeating: 0, count: 8)
            ), "overflows"
        ),
        (
            Self.file(
                header:
                    #"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#,
                data: [UInt8](repeating: 0, count: 8)
            ), "overlap"
        ),
    ])
    func damagedFilesAreRefused(bytes: [UInt8], expected: String) {
        #expect {
            _ = try SafeTensors(bytes: bytes, file: "bad.safetensors")
        } throws: { error in
            "\(error)".hasPrefix("bad.safetensors: ") && "\(error)".contains(expected)
        }
    }

    /// Seeded mutations of a valid file (bytes flipped in the header length, the header and the data,
    /// or the file cut short): each is read or refused with a `TraceFileError`, never a crash, and a
    /// file that is read yields its layers or refuses them the same way.
    @Test func mutatedFilesAreReadOrRefusedNeverCrash() throws {
        let seed: UInt64 = 14
        var rng = Seeded(mix: SplitMix64(state: seed))
        let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: seed).sequence(0)
        let valid = try Self.written(trace, queryRows: 4).serialized()
        let headerEnd = 8 + Int(valid[0]) + Int(valid[1]) << 8
        var read = 0
        for round in 0..<2_000 {
            var bytes = valid
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let region = Int.random(in: 0..<3, using: &rng)
                let index =
                    region == 0
                    ? Int.random(in: 0..<8, using: &rng)
                    : region == 1
                        ? Int.random(in: 8..<headerEnd, using: &rng)
                        : Int.random(in: headerEnd..<bytes.count, using: &rng)
                bytes[index] = UInt8.random(in: 0...255, using: &rng)
            }
            if round % 10 == 0 { bytes.removeLast(Int.random(in: 1..<bytes.count, using: &rng)) }
            guard let file = try? SafeTensors(bytes: bytes, file: "m.safetensors"), let trace = try? TraceFile(file)
            else {
                continue
            }
            read += 1
            for layer in 0..<trace.geometry.layers {
                do {
                    _ = try trace.prefill(layer: layer)
                    _ = try trace.decode(layer: layer)
                } catch {
                    #expect(error is TraceFileError || error is KVCacheError, "seed \(seed) round \(round): \(error)")
                }
            }
        }
        #expect(read > 0, "seed \(seed): no mutation left the file readable, so layers were never read")
    }

    @Test func tracesThatDisagreeWithThemselvesAreRefused() throws {
        let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: 13).sequence(0)
        let good = try Self.written(trace)
        func refused(
            _ change: (inout SafeTensors) -> Void,
            _ expected: String,
            sourceLocation: SourceLocation = #_sourceLocation
        ) {
            var file = good
            change(&file)
            #expect(sourceLocation: sourceLocation) {
                _ = try TraceFile(try SafeTensors(bytes: file.serialized(), file: "t.safetensors"))
            } throws: { "\($0)".contains(expected) }
        }
        refused({ $0.setMetadata("format", "other") }, "expected 'tessera.trace.v1'")
        refused(
            { $0.setMetadata("spans", #"[{"kind":"text","index":0,"start":0,"count":5}]"#) },
            "the geometry and spans need"
        )
        refused(
            { $0.setMetadata("spans", #"[{"kind":"text","index":0,"start":3,"count":5}]"#) },
            "without gaps or overlaps"
        )
        refused({ $0.setMetadata("spans", #"[{"kind":"audio","index":0,"start":0,"count":5}]"#) }, "kind 'audio'")
        refused({ $0.setMetadata("geometry", #"{"name":"x"}"#) }, "__metadata__.geometry")
        refused({ $0.setMetadata("decode_steps", "-1") }, "decode_steps")
        var poisoned = good
        let shape = try good.shape("layers.2.values")
        var values = try good.floats("layers.2.values", shape: shape)
        values[17] = .nan
        poisoned.add("layers.2.values", floats: values, shape: shape)
        let file = try TraceFile(try SafeTensors(bytes: poisoned.serialized(), file: "p.safetensors"))
        #expect {
            _ = try file.prefill(layer: 2)
        } throws: { "\($0)".contains("layers.2.values element 17 is nan") }
    }
}

public import KVCacheCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What evaluating a policy needs from one sequence: its model and prompt layout, the planted needle
/// if any, and per layer the prefill tensors and the decode steps. Generated (`SequenceTrace`) or
/// read from a file (`TraceFile`).
public protocol PromptTrace: Sendable {
    var geometry: ModelGeometry { get }
    var layout: PromptLayout { get }
    var needle: Needle? { get }
    var decodeSteps: Int { get }
    func prefill(layer: Int) throws -> LayerPrefill
    func decode(layer: Int) throws -> [DecodeStepInput]
}

extension SequenceTrace: PromptTrace {}

/// One sequence's trace in a safetensors file (`tessera trace export` writes them; a model's own
/// cache can be dumped the same way). The layout:
///
/// - `__metadata__`: `format` = `tessera.trace.v1`; `geometry` = JSON `{"name", "layers",
///   "query_heads", "kv_heads", "head_dim", "tokens_per_image"}`; `spans` = JSON
///   `[{"kind": "text"|"image"|"video_frame", "index", "start", "count"}]`, tiling the prompt in
///   order; `decode_steps` = the number of decode steps; optionally `needle` = JSON `{"positions",
///   "modality": {"kind", "index"}, "answer", "answer_count", "probes": [{"layer", "query_head",
///   "step"}]}` with the tensor `needle.codebook` `[answer_count, head_dim]`.
/// - per layer `L`: `layers.L.keys` and `layers.L.values` `[kv_heads, tokens, head_dim]`;
///   `layers.L.queries` `[query_heads, rows, head_dim]`, the last `rows` prompt rows' queries (what
///   the scoring policies observe; absent when none); with decode steps, `layers.L.decode.keys` and
///   `layers.L.decode.values` `[kv_heads, steps, head_dim]` and `layers.L.decode.queries`
///   `[query_heads, steps, head_dim]`.
///
/// Tensors are F32, F16 or BF16, and read as Float32. Everything but the tensors' elements is checked
/// when the file is opened; elements are checked finite when a layer is read.
public struct TraceFile: PromptTrace {
    public static let format = "tessera.trace.v1"

    public let geometry: ModelGeometry
    public let layout: PromptLayout
    public let needle: Needle?
    public let decodeSteps: Int
    /// Query rows stored per layer (the last prompt rows).
    public let queryRows: Int
    private let file: SafeTensors

    public var path: String { file.file }

    /// The element type the prefill tensors can cross the wire in without loss: float16 when every
    /// layer's keys, values and queries are stored as F16, else float32.
    public var prefillScalarType: ScalarType {
        let prefill = (0..<geometry.layers).flatMap { layer in
            ["keys", "values", "queries"].map { "layers.\(layer).\($0)" }
        }
        return prefill.allSatisfy { file.entries[$0].map { $0.dtype == .f16 } ?? true } ? .float16 : .float32
    }

    /// Opens and checks the trace at `path`.
    public init(contentsOf path: String) throws(TraceFileError) {
        try self.init(SafeTensors(contentsOf: path))
    }

    public init(_ file: SafeTensors) throws(TraceFileError) {
        self.file = file
        let name = file.file
        guard file.metadata["format"] == Self.format else {
            throw TraceFileError(
                name,
                "__metadata__.format is \(file.metadata["format"].map { "'\($0)'" } ?? "missing"); expected '\(Self.format)'"
            )
        }
        let g: ModelGeometry
        do {
            g = try Self.json(GeometryRecord.self, "geometry", file).geometry()
        } catch let error as TraceFileError {
            throw error
        } catch {
            throw TraceFileError(name, "__metadata__.geometry: \(error)")
        }
        geometry = g
        do {
            layout = try PromptLayout(spans: try Self.json([SpanRecord].self, "spans", file).map { try $0.span() })
        } catch let error as TraceFileError {
            throw error
        } catch {
            throw TraceFileError(name, "__metadata__.spans: \(error)")
        }
        guard let steps = file.metadata["decode_steps"].flatMap(Int.init), steps >= 0 else {
            throw TraceFileError(name, "__metadata__.decode_steps must be a count of decode steps (0 or more)")
        }
        decodeSteps = steps
        let m = layout.promptLength
        let rows = file.entries["layers.0.queries"]?.shape.dropLast().last ?? 0
        queryRows = rows
        for layer in 0..<g.layers {
            let prefix = "layers.\(layer)"
            try Self.expect(file, "\(prefix).keys", [g.kvHeads, m, g.headDim])
            try Self.expect(file, "\(prefix).values", [g.kvHeads, m, g.headDim])
            if rows > 0 { try Self.expect(file, "\(prefix).queries", [g.queryHeads, rows, g.headDim]) }
            if steps > 0 {
                try Self.expect(file, "\(prefix).decode.keys", [g.kvHeads, steps, g.headDim])
                try Self.expect(file, "\(prefix).decode.values", [g.kvHeads, steps, g.headDim])
                try Self.expect(file, "\(prefix).decode.queries", [g.queryHeads, steps, g.headDim])
            }
        }
        guard (0...m).contains(rows) else {
            throw TraceFileError(name, "layers.0.queries has \(rows) rows; the prompt has \(m)")
        }
        if file.metadata["needle"] != nil {
            do {
                let record = try Self.json(NeedleRecord.self, "needle", file)
                let codebook = try file.floats("needle.codebook", shape: [record.answerCount, g.headDim])
                needle = try record.needle(codebook: codebook, geometry: g, layout: layout, decodeSteps: steps)
            } catch let error as TraceFileError {
                throw error
            } catch {
                throw TraceFileError(name, "__metadata__.needle: \(error)")
            }
        } else {
            needle = nil
        }
    }

    public func prefill(layer: Int) throws -> LayerPrefill {
        let g = geometry
        let m = layout.promptLength
        let prefix = "layers.\(layer)"
        return try LayerPrefill(
            geometry: g,
            promptLength: m,
            keys: try file.floats("\(prefix).keys", shape: [g.kvHeads, m, g.headDim]),
            values: try file.floats("\(prefix).values", shape: [g.kvHeads, m, g.headDim]),
            queries: queryRows == 0
                ? [] : try file.floats("\(prefix).queries", shape: [g.queryHeads, queryRows, g.headDim]),
            queryRows: queryRows
        )
    }

    public func decode(layer: Int) throws -> [DecodeStepInput] {
        guard decodeSteps > 0 else { return [] }
        let g = geometry
        let d = g.headDim
        let prefix = "layers.\(layer).decode"
        let keys = try file.floats("\(prefix).keys", shape: [g.kvHeads, decodeSteps, d])
        let values = try file.floats("\(prefix).values", shape: [g.kvHeads, decodeSteps, d])
        let queries = try file.floats("\(prefix).queries", shape: [g.queryHeads, decodeSteps, d])
        return try (0..<decodeSteps).map { t in
            try DecodeStepInput(
                geometry: g,
                keys: Self.rows(keys, heads: g.kvHeads, total: decodeSteps, d: d, from: t, count: 1),
                values: Self.rows(values, heads: g.kvHeads, total: decodeSteps, d: d, from: t, count: 1),
                queries: Self.rows(queries, heads: g.queryHeads, total: decodeSteps, d: d, from: t, count: 1)
            )
        }
    }

    /// Rows `first ..< first + count` of every head of a `[heads, total, d]` tensor: `[heads, count, d]`.
    private static func rows(_ tensor: [Float], heads: Int, total: Int, d: Int, from first: Int, count: Int) -> [Float]
    {
        var rows: [Float] = []
        rows.reserveCapacity(heads * count * d)
        for h in 0..<heads {
            let start = (h * total + first) * d
            rows.append(contentsOf: tensor[start..<start + count * d])
        }
        return rows
    }

    /// Per-step rows `[heads, d]` stacked as `[heads, steps, d]`.
    private static func stacked(_ steps: [[Float]], heads: Int, d: Int) -> [Float] {
        var stacked: [Float] = []
        stacked.reserveCapacity(heads * steps.count * d)
        for h in 0..<heads {
            for step in steps { stacked.append(contentsOf: step[h * d..<(h + 1) * d]) }
        }
        return stacked
    }

    /// Writes `trace` (every layer, `queryRows` last prompt rows of queries, every decode step) in
    /// `dtype` to `path`.
    public static func write(
        _ trace: some PromptTrace,
        queryRows: Int? = nil,
        as dtype: SafeTensors.DType = .f32,
        to path: String
    ) throws {
        let g = trace.geometry
        let m = trace.layout.promptLength
        let d = g.headDim
        var file = SafeTensors(file: path)
        file.setMetadata("format", format)
        file.setMetadata("geometry", try geometryJSON(g))
        file.setMetadata("spans", try encode(trace.layout.spans.map(SpanRecord.init)))
        file.setMetadata("decode_steps", "\(trace.decodeSteps)")
        if let needle = trace.needle {
            file.setMetadata("needle", try encode(NeedleRecord(needle)))
            file.add("needle.codebook", floats: needle.codebook, shape: [needle.answerCount, d])
        }
        for layer in 0..<g.layers {
            let prefill = try trace.prefill(layer: layer)
            let rows = min(queryRows ?? prefill.queryRows, prefill.queryRows)
            let keys = LayerPrefill.contiguous(prefill.keys)
            let values = LayerPrefill.contiguous(prefill.values)
            file.add("layers.\(layer).keys", floats: keys, shape: [g.kvHeads, m, d], as: dtype)
            file.add("layers.\(layer).values", floats: values, shape: [g.kvHeads, m, d], as: dtype)
            if rows > 0 {
                let total = prefill.queryRows
                let queries = Self.rows(
                    prefill.queries,
                    heads: g.queryHeads,
                    total: total,
                    d: d,
                    from: total - rows,
                    count: rows
                )
                file.add("layers.\(layer).queries", floats: queries, shape: [g.queryHeads, rows, d], as: dtype)
            }
            let steps = try trace.decode(layer: layer)
            guard !steps.isEmpty else { continue }
            let decode = "layers.\(layer).decode"
            let kv = [g.kvHeads, steps.count, d]
            file.add(
                "\(decode).keys",
                floats: Self.stacked(steps.map(\.keys), heads: g.kvHeads, d: d),
                shape: kv,
                as: dtype
            )
            file.add(
                "\(decode).values",
                floats: Self.stacked(steps.map(\.values), heads: g.kvHeads, d: d),
                shape: kv,
                as: dtype
            )
            file.add(
                "\(decode).queries",
                floats: Self.stacked(steps.map(\.queries), heads: g.queryHeads, d: d),
                shape: [g.queryHeads, steps.count, d],
                as: dtype
            )
        }
        try file.write(to: path)
    }

    /// `geometry` as the JSON a trace file's `__metadata__.geometry` holds.
    public static func geometryJSON(_ geometry: ModelGeometry) throws -> String {
        try encode(GeometryRecord(geometry))
    }

    private static func expect(_ file: SafeTensors, _ name: String, _ shape: [Int]) throws(TraceFileError) {
        let found = try file.shape(name)
        guard found == shape else {
            throw TraceFileError(file.file, "tensor \(name) has shape \(found); the geometry and spans need \(shape)")
        }
    }

    private static func json<T: Decodable>(_: T.Type, _ key: String, _ file: SafeTensors) throws -> T {
        guard let text = file.metadata[key] else {
            throw TraceFileError(file.file, "__metadata__.\(key) is missing")
        }
        do {
            return try JSONDecoder().decode(T.self, from: Data(text.utf8))
        } catch {
            throw TraceFileError(file.file, "__metadata__.\(key) is not the JSON expected: \(error)")
        }
    }

    private static func encode(_ value: some Encodable) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }
}

private struct GeometryRecord: Codable {
    var name: String
    var layers: Int
    var queryHeads: Int
    var kvHeads: Int
    var headDim: Int
    var tokensPerImage: Int

    enum CodingKeys: String, CodingKey {
        case name, layers
        case queryHeads = "query_heads"
        case kvHeads = "kv_heads"
        case headDim = "head_dim"
        case tokensPerImage = "tokens_per_image"
    }

    init(_ g: ModelGeometry) {
        (name, layers, queryHeads, kvHeads, headDim, tokensPerImage) =
            (g.name, g.layers, g.queryHeads, g.kvHeads, g.headDim, g.tokensPerImage)
    }

    func geometry() throws -> ModelGeometry {
        try ModelGeometry(
            name: name,
            layers: layers,
            queryHeads: queryHeads,
            kvHeads: kvHeads,
            headDim: headDim,
            tokensPerImage: tokensPerImage
        )
    }
}

private struct ModalityRecord: Codable {
    var kind: String
    var index: Int

    init(_ modality: Modality) {
        switch modality {
        case .text: (kind, index) = ("text", 0)
        case .image(let n): (kind, index) = ("image", n)
        case .videoFrame(let n): (kind, index) = ("video_frame", n)
        }
    }

    func modality() throws -> Modality {
        switch kind {
        case "text": return .text
        case "image": return .image(index)
        case "video_frame": return .videoFrame(index)
        default: throw KVCacheError(.invalidSetting, "kind '\(kind)' is not text, image or video_frame")
        }
    }
}

private struct SpanRecord: Codable {
    var kind: String
    var index: Int
    var start: Int
    var count: Int

    init(_ span: ModalitySpan) {
        let modality = ModalityRecord(span.modality)
        (kind, index, start, count) = (modality.kind, modality.index, span.start, span.count)
    }

    func span() throws -> ModalitySpan {
        ModalitySpan(try ModalityRecord(kind: kind, index: index).modality(), start: start, count: count)
    }
}

extension ModalityRecord {
    fileprivate init(kind: String, index: Int) {
        self.kind = kind
        self.index = index
    }
}

private struct NeedleRecord: Codable {
    struct Probe: Codable {
        var layer: Int
        var queryHead: Int
        var step: Int

        enum CodingKeys: String, CodingKey {
            case layer, step
            case queryHead = "query_head"
        }
    }

    var positions: [Int]
    var modality: ModalityRecord
    var answer: Int
    var answerCount: Int
    var probes: [Probe]

    enum CodingKeys: String, CodingKey {
        case positions, modality, answer, probes
        case answerCount = "answer_count"
    }

    init(_ needle: Needle) {
        positions = needle.positions
        modality = ModalityRecord(needle.modality)
        answer = needle.answer
        answerCount = needle.answerCount
        probes = needle.probes.map { Probe(layer: $0.layer, queryHead: $0.queryHead, step: $0.step) }
    }

    func needle(codebook: [Float], geometry g: ModelGeometry, layout: PromptLayout, decodeSteps: Int) throws -> Needle {
        guard answerCount >= 1, (0..<answerCount).contains(answer) else {
            throw KVCacheError(.invalidSetting, "answer \(answer) must index answer_count \(answerCount) codes")
        }
        guard positions.allSatisfy({ (0..<layout.promptLength).contains($0) }) else {
            throw KVCacheError(.invalidSetting, "positions must lie in the prompt, 0..<\(layout.promptLength)")
        }
        guard
            probes.allSatisfy({
                (0..<g.layers).contains($0.layer) && (0..<g.queryHeads).contains($0.queryHead)
                    && (0..<decodeSteps).contains($0.step)
            })
        else {
            throw KVCacheError(.invalidSetting, "every probe's layer, query_head and step must exist in the trace")
        }
        return Needle(
            positions: positions,
            modality: try modality.modality(),
            answer: answer,
            answerCount: answerCount,
            codebook: codebook,
            headDim: g.headDim,
            probes: probes.map { NeedleProbe(layer: $0.layer, queryHead: $0.queryHead, step: $0.step) }
        )
    }
}

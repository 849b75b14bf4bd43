public import KVCacheCore
import Yams

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A load-test workload: which model, which mix of request kinds, their prompt shapes and how
/// requests arrive. Read from YAML (`cluster/workloads/*.yaml`), or made from a built-in preset.
public struct WorkloadFile: Sendable, Hashable {
    /// One concrete preset of the mix and its relative weight.
    public struct Share: Sendable, Hashable {
        public var preset: WorkloadPreset
        public var weight: Double

        public init(preset: WorkloadPreset, weight: Double) {
            self.preset = preset
            self.weight = weight
        }
    }

    /// How the load generator issues sequences.
    public enum Arrival: Sendable, Hashable {
        /// A fixed number of sequences in flight; each finished one starts the next.
        case closed(concurrency: Int)
        /// Open loop: sequences start at exponential intervals, whatever is in flight.
        case poisson(ratePerSecond: Double)
    }

    public var name: String
    /// The model preset with the file's `tokensPerImage` applied.
    public var geometry: ModelGeometry
    /// Defaults plus the file's prompt-shape knobs.
    public var traceSettings: TraceSettings
    public var arrival: Arrival
    /// Concrete presets (never `.mixed`) with positive weights; they need not sum to 1.
    public var mix: [Share]

    /// A built-in preset as a workload of one share; `.mixed` becomes its `mixtureWeights`.
    public init(
        preset: WorkloadPreset,
        geometry: ModelGeometry,
        settings: TraceSettings = .defaults,
        arrival: Arrival = .closed(concurrency: 4)
    ) {
        name = preset.rawValue
        self.geometry = geometry
        traceSettings = settings
        self.arrival = arrival
        mix =
            preset == .mixed
            ? WorkloadPreset.mixtureWeights.map { Share(preset: $0.preset, weight: $0.weight) }
            : [Share(preset: preset, weight: 1)]
    }

    /// The concrete preset of sequence `index`: a weighted draw that depends only on `seed` and `index`.
    public func preset(forSequence index: Int, seed: UInt64) -> WorkloadPreset {
        precondition(!mix.isEmpty, "a workload needs at least one share")
        // Stream index b = 1 keeps this draw apart from the trace's own sequence stream (b = 0).
        var rng = StructureRNG(seed: StreamKind.sequence.seed(seed, index, 1))
        var u = rng.uniform() * mix.reduce(0) { $0 + $1.weight }
        for share in mix {
            if u < share.weight { return share.preset }
            u -= share.weight
        }
        return mix[mix.count - 1].preset  // only reached through rounding
    }

    /// Reads and validates a workload file.
    ///
    /// - Throws: ``WorkloadError`` with code `invalidFile`: the file is unreadable, not YAML, or breaks
    ///   a rule; the message names `path`, the line and the field.
    public static func load(path: String) throws(WorkloadError) -> WorkloadFile {
        let data: Data
        do {
            data = try Data(contentsOf: URL(filePath: path))
        } catch let error as CocoaError where error.code == .fileReadNoSuchFile || error.code == .fileNoSuchFile {
            throw WorkloadError(.invalidFile, "\(path): cannot read workload file: no such file")
        } catch {
            throw WorkloadError(.invalidFile, "\(path): cannot read workload file: \(error)")
        }
        guard let yaml = String(validating: data, as: UTF8.self) else {
            throw WorkloadError(.invalidFile, "\(path): not UTF-8 text")
        }
        return try parse(yaml: yaml, source: path)
    }

    /// Decodes and validates a workload from YAML text; `source` names it in error messages.
    public static func parse(yaml: String, source: String) throws(WorkloadError) -> WorkloadFile {
        let reader = WorkloadFileReader(source: source)
        let root: Node?
        do {
            // The basic resolver leaves every scalar a string; the reader converts it per field.
            root = try Parser(yaml: yaml, resolver: .basic).singleRoot()
        } catch {
            throw reader.syntaxError(error)
        }
        guard let root else { throw reader.error("the file is empty; name and mix are required", at: nil) }
        return try reader.workload(root)
    }
}

/// Walks the YAML nodes of one workload file, turning every problem into a message with the file,
/// line and field path.
private struct WorkloadFileReader {
    let source: String

    static let rootKeys = [
        "name", "model", "tokensPerImage", "mix", "imagesPerRequest", "framesPerVideo", "documentTextTokens",
        "textScale", "decodeTokens", "arrival",
    ]
    static let concretePresets = WorkloadPreset.allCases.filter { $0 != .mixed }
    static var rangeKeys: [(key: String, setting: WritableKeyPath<TraceSettings, ClosedRange<Int>>)] {
        [
            ("imagesPerRequest", \.imagesPerRequest), ("framesPerVideo", \.framesPerVideo),
            ("documentTextTokens", \.documentTextTokens),
        ]
    }

    func error(_ message: String, at node: Node?) -> WorkloadError { error(message, mark: node?.mark) }

    func error(_ message: String, mark: Mark?) -> WorkloadError {
        let location = mark.map { ":\($0.line):\($0.column)" } ?? ""
        return WorkloadError(.invalidFile, "\(source)\(location): \(message)")
    }

    func syntaxError(_ error: any Error) -> WorkloadError {
        switch error as? YamlError {
        case .scanner(let context, let problem, let mark, _),
            .parser(let context, let problem, let mark, _),
            .composer(let context, let problem, let mark, _):
            return self.error("invalid YAML: " + (context.map { "\($0.text) " } ?? "") + problem, mark: mark)
        case .duplicatedKeysInMapping(let duplicates, let context):
            return self.error("invalid YAML: duplicate key \(duplicates.joined(separator: ", "))", mark: context.mark)
        default:
            return self.error("invalid YAML: \(error)", mark: nil)
        }
    }

    func workload(_ root: Node) throws(WorkloadError) -> WorkloadFile {
        let fields = try Fields(root, path: "", allowed: Self.rootKeys, reader: self)

        let name = try fields.string(fields.required("name"), "name")
        guard !name.isEmpty else { throw error("name must not be empty", at: fields.values["name"]) }

        var geometry = ModelGeometry.llava16Mistral7b
        if let node = fields.values["model"] {
            let model = try fields.string(node, "model")
            do throws(KVCacheError) {
                geometry = try ModelGeometry.preset(named: model)
            } catch {
                throw self.error("model: \(error.message)", at: node)
            }
        }
        if let node = fields.values["tokensPerImage"] {
            geometry.tokensPerImage = try fields.int(node, "tokensPerImage")
            do throws(KVCacheError) {
                try geometry.validate()
            } catch {
                throw self.error(error.message, at: node)
            }
        }
        let mix = try mix(fields.required("mix"))

        var settings = TraceSettings.defaults
        if let node = fields.values["textScale"] { settings.textScale = try fields.number(node, "textScale") }
        if let node = fields.values["decodeTokens"] {
            // Stricter than TraceSettings (which allows 0): a load test decodes at least one token.
            let tokens = try fields.int(node, "decodeTokens")
            guard (1...4096).contains(tokens) else {
                throw error("decodeTokens must be in 1...4096, got \(tokens)", at: node)
            }
            settings.decodeSteps = tokens
        }
        for (key, setting) in Self.rangeKeys {
            if let node = fields.values[key] { settings[keyPath: setting] = try range(node, path: key) }
        }
        do throws(WorkloadError) {
            try settings.validate()
        } catch {
            // Its messages start with the setting's name, which is also the key for every knob a file sets.
            let key = String(error.message.prefix { $0 != " " })
            throw self.error(error.message, at: fields.values[key])
        }

        let arrival = try arrival(fields.values["arrival"])
        return WorkloadFile(name: name, geometry: geometry, traceSettings: settings, arrival: arrival, mix: mix)
    }

    private func mix(_ node: Node) throws(WorkloadError) -> [WorkloadFile.Share] {
        guard case .sequence(let entries) = node else {
            throw error("mix must be a list of {preset, weight}, got \(describe(node))", at: node)
        }
        guard !entries.isEmpty else { throw error("mix must list at least one preset", at: node) }
        let allowed = Self.concretePresets.map(\.rawValue).joined(separator: ", ")
        var shares: [WorkloadFile.Share] = []
        for (i, entry) in entries.enumerated() {
            let path = "mix[\(i)]"
            let share = try Fields(entry, path: path, allowed: ["preset", "weight"], reader: self)
            let presetNode = try share.required("preset")
            let presetName = try share.string(presetNode, "preset")
            guard let preset = WorkloadPreset(rawValue: presetName) else {
                throw error("\(path).preset: unknown preset '\(presetName)'; allowed: \(allowed)", at: presetNode)
            }
            guard preset != .mixed else {
                throw error("\(path).preset: 'mixed' is itself a mix; allowed: \(allowed)", at: presetNode)
            }
            if let first = shares.firstIndex(where: { $0.preset == preset }) {
                throw error("\(path).preset: '\(presetName)' already appears in mix[\(first)]", at: presetNode)
            }
            let weightNode = try share.required("weight")
            let weight = try share.number(weightNode, "weight")
            guard weight.isFinite, weight > 0 else {
                throw error("\(path).weight must be a finite number > 0, got \(weight)", at: weightNode)
            }
            shares.append(.init(preset: preset, weight: weight))
        }
        return shares
    }

    private func arrival(_ node: Node?) throws(WorkloadError) -> WorkloadFile.Arrival {
        guard let node else { return .closed(concurrency: 4) }
        let fields = try Fields(node, path: "arrival", allowed: ["process", "concurrency", "rate"], reader: self)
        var process = "closed"
        if let node = fields.values["process"] { process = try fields.string(node, "process") }
        switch process {
        case "closed":
            if let rate = fields.values["rate"] {
                throw error("arrival.rate is only allowed with process: poisson", at: rate)
            }
            guard let node = fields.values["concurrency"] else { return .closed(concurrency: 4) }
            let concurrency = try fields.int(node, "concurrency")
            guard (1...1024).contains(concurrency) else {
                throw error("arrival.concurrency must be in 1...1024, got \(concurrency)", at: node)
            }
            return .closed(concurrency: concurrency)
        case "poisson":
            if let concurrency = fields.values["concurrency"] {
                throw error("arrival.concurrency is only allowed with process: closed", at: concurrency)
            }
            let node = try fields.required("rate")
            let rate = try fields.number(node, "rate")
            guard rate > 0, rate <= 10000 else {
                throw error("arrival.rate must be in (0, 10000] sequences per second, got \(rate)", at: node)
            }
            return .poisson(ratePerSecond: rate)
        case let other:
            throw error(
                "arrival.process must be one of closed, poisson, got '\(other)'",
                at: fields.values["process"]
            )
        }
    }

    /// `{min: a, max: b}` as `a...b`; the allowed bounds are `TraceSettings.validate()`'s to check.
    private func range(_ node: Node, path: String) throws(WorkloadError) -> ClosedRange<Int> {
        let fields = try Fields(node, path: path, allowed: ["min", "max"], reader: self)
        let low = try fields.int(fields.required("min"), "min")
        let high = try fields.int(fields.required("max"), "max")
        guard low <= high else { throw error("\(path): min (\(low)) must not exceed max (\(high))", at: node) }
        return low...high
    }

    func describe(_ node: Node) -> String {
        switch node {
        case .scalar(let scalar): "'\(scalar.string)'"
        case .mapping: "a mapping"
        case .sequence: "a list"
        case .alias: "an alias"
        }
    }

    /// The keys of one YAML mapping, checked against the allowed ones; `null` values count as absent.
    struct Fields {
        let node: Node
        let path: String
        let values: [String: Node]
        let reader: WorkloadFileReader

        init(_ node: Node, path: String, allowed: [String], reader: WorkloadFileReader) throws(WorkloadError) {
            let subject = path.isEmpty ? "the workload" : path
            guard case .mapping(let mapping) = node else {
                throw reader.error("\(subject) must be a mapping, got \(reader.describe(node))", at: node)
            }
            var values: [String: Node] = [:]
            for (key, value) in mapping {
                guard let name = key.scalar?.string, allowed.contains(name) else {
                    let place = path.isEmpty ? "" : " in \(path)"
                    throw reader.error(
                        "unknown key \(reader.describe(key))\(place); allowed: \(allowed.joined(separator: ", "))",
                        at: key
                    )
                }
                if !Self.isNull(value) { values[name] = value }
            }
            self.node = node
            self.path = path
            self.values = values
            self.reader = reader
        }

        private static func isNull(_ node: Node) -> Bool {
            guard case .scalar(let scalar) = node else { return false }
            return scalar.style == .plain && ["", "~", "null", "Null", "NULL"].contains(scalar.string)
        }

        func fieldPath(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

        func required(_ key: String) throws(WorkloadError) -> Node {
            guard let value = values[key] else { throw reader.error("\(fieldPath(key)) is required", at: node) }
            return value
        }

        func string(_ node: Node, _ key: String) throws(WorkloadError) -> String {
            guard case .scalar(let scalar) = node else { throw mismatch(node, key, "a single value") }
            return scalar.string
        }

        func int(_ node: Node, _ key: String) throws(WorkloadError) -> Int {
            guard let value = node.int else { throw mismatch(node, key, "an integer") }
            return value
        }

        func number(_ node: Node, _ key: String) throws(WorkloadError) -> Double {
            guard let value = node.float else { throw mismatch(node, key, "a number") }
            return value
        }

        private func mismatch(_ node: Node, _ key: String, _ expected: String) -> WorkloadError {
            reader.error("\(fieldPath(key)) must be \(expected), got \(reader.describe(node))", at: node)
        }
    }
}

extension WorkloadFile {
    /// Memberwise, for the reader (which validates first).
    fileprivate init(
        name: String,
        geometry: ModelGeometry,
        traceSettings: TraceSettings,
        arrival: Arrival,
        mix: [Share]
    ) {
        self.name = name
        self.geometry = geometry
        self.traceSettings = traceSettings
        self.arrival = arrival
        self.mix = mix
    }
}

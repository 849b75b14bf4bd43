public import KVCacheCore
import Synchronization

/// A seeded source of synthetic multimodal prefill and decode traces.
///
/// Everything is a pure function of `(preset, geometry, settings, seed)` and the sequence index;
/// each (sequence, layer) derives its own random streams, so one layer can be expanded alone, in
/// any order, in any process, with bit-identical floats.
///
/// The attention structure follows the papers' observations (ALGORITHMS.md §0–§3) and nothing
/// else: a sink at position 0; dense first layers and non-monotonic sparsity elsewhere; visual
/// query rows that attend almost uniformly; post-vision text rows that attend sharply to a
/// per-head salient set which decode queries mostly reuse; heads that prefer one modality;
/// spatially redundant image patches; recency; and a needle read by a few retrieval heads.
public struct TraceGenerator: Sendable {
    public let preset: WorkloadPreset
    public let geometry: ModelGeometry
    public let settings: TraceSettings
    public let seed: UInt64
    let model: ModelPlan

    /// - Precondition: `settings.validate()` passes and `geometry.headDim >= 8` (half of every head
    ///   is reserved for the sink, needle and salient-key directions).
    public init(preset: WorkloadPreset, geometry: ModelGeometry, settings: TraceSettings = .defaults, seed: UInt64) {
        do {
            try settings.validate()
        } catch {
            preconditionFailure("invalid trace settings: \(error)")
        }
        precondition(geometry.headDim >= 8, "the trace generator needs headDim >= 8, got \(geometry.headDim)")
        self.preset = preset
        self.geometry = geometry
        self.settings = settings
        self.seed = seed
        model = ModelPlan(geometry: geometry, settings: settings, seed: seed)
    }

    /// The per-layer target sparsity of the simulated model (sequences add a little jitter).
    public var modelSparsity: [Double] { model.sparsityCurve }

    /// The modality preference π of every (layer, query head), row-major by layer.
    public var headPreferences: [Double] { model.headPreference }

    /// Whether query head `queryHead` of `layer` retrieves the needle.
    public func isRetrievalHead(layer: Int, queryHead: Int) -> Bool {
        model.isRetrieval(layer: layer, queryHead: queryHead)
    }

    /// Sequence `index`: its layout, needle and targets. Cheap; tensors are made per layer on demand.
    public func sequence(_ index: Int) -> SequenceTrace {
        let sequenceSeed = StreamKind.sequence.seed(seed, index)
        var rng = StructureRNG(seed: sequenceSeed)
        let concrete = PromptPlanner.concretePreset(preset, rng: &rng)
        let spans = PromptPlanner.spans(preset: concrete, geometry: geometry, settings: settings, rng: &rng)
        let layout: PromptLayout
        do {
            layout = try PromptLayout(spans: spans)
        } catch {
            preconditionFailure("the planner built spans that do not tile the prompt: \(error)")
        }
        let dense = min(settings.denseLayerCount, geometry.layers)
        let targets = model.sparsityCurve.enumerated().map { layer, value in
            let range = layer < dense ? settings.denseSparsity : settings.sparseSparsity
            return min(range.upperBound, max(range.lowerBound, value + rng.uniform(in: -0.015...0.015)))
        }
        let needle = PromptPlanner.needle(
            preset: concrete,
            layout: layout,
            geometry: geometry,
            settings: settings,
            model: model,
            decodeSteps: settings.decodeSteps,
            seed: sequenceSeed
        )
        return SequenceTrace(
            geometry: geometry,
            preset: concrete,
            layout: layout,
            decodeSteps: settings.decodeSteps,
            seed: sequenceSeed,
            index: index,
            needle: needle,
            targetSparsity: targets,
            settings: settings,
            model: model
        )
    }
}

/// One synthetic request: the prompt layout and what the generator aimed for, plus the per-layer
/// tensors on demand.
public struct SequenceTrace: Sendable {
    public let geometry: ModelGeometry
    /// The concrete preset (never `.mixed`).
    public let preset: WorkloadPreset
    public let layout: PromptLayout
    public let decodeSteps: Int
    /// The sequence's own seed, derived from the generator seed and `index`.
    public let seed: UInt64
    public let index: Int
    public let needle: Needle?
    /// Per layer, the VL-Cache sparsity the generator aimed for in post-vision rows.
    public let targetSparsity: [Double]
    public let settings: TraceSettings
    let model: ModelPlan

    public var promptLength: Int { layout.promptLength }

    /// Layer `layer`'s keys, values and the queries of every prompt row (`queryRows == promptLength`).
    public func prefill(layer: Int) -> LayerPrefill {
        LayerSynthesizer(trace: self, layer: layer).prefill()
    }

    /// Layer `layer`'s decode steps: step `t` appends position `promptLength + t`.
    public func decode(layer: Int) -> [DecodeStepInput] {
        LayerSynthesizer(trace: self, layer: layer).decode()
    }

    /// Both at once, sharing the layer plan. With `firstQueryRow`, only the query rows from there on
    /// are synthesised (what a policy that observes those rows needs; they equal the full prefill's).
    /// Small layers are kept for reuse (see `RecentLayers`).
    public func layerTrace(_ layer: Int, firstQueryRow: Int = 0) -> (prefill: LayerPrefill, decode: [DecodeStepInput]) {
        let key = RecentLayers.Key(
            geometry: geometry,
            preset: preset,
            layout: layout,
            decodeSteps: decodeSteps,
            seed: seed,
            index: index,
            settings: settings,
            layer: layer,
            firstQueryRow: firstQueryRow
        )
        if let known = RecentLayers.find(key) { return known }
        let synthesised = LayerSynthesizer(trace: self, layer: layer).prefillAndDecode(firstQueryRow: firstQueryRow)
        RecentLayers.keep(synthesised, for: key)
        return synthesised
    }

    /// Floats in a layer as `layerTrace` returns it: the prefill's keys, values and query rows, and
    /// every decode step's.
    public static func floats(in layer: (prefill: LayerPrefill, decode: [DecodeStepInput])) -> Int {
        layer.prefill.keyValueFloats + layer.prefill.queries.count
            + layer.decode.reduce(0) { $0 + $1.keys.count + $1.values.count + $1.queries.count }
    }

    /// Whether query head `queryHead` of `layer` retrieves the needle.
    public func isRetrievalHead(layer: Int, queryHead: Int) -> Bool {
        model.isRetrieval(layer: layer, queryHead: queryHead)
    }

    /// The modality preference π the generator drew for (layer, query head).
    public func headPreference(layer: Int, queryHead: Int) -> Double {
        model.headPreference[layer * geometry.queryHeads + queryHead]
    }
}

/// Layers synthesised recently, when small: every copy of a shard synthesises the same prompt, and
/// a simulation or a load test runs the same few prompts under every policy it compares, so the
/// same layers come back often. Synthesis is deterministic, so a kept layer equals a new one bit for
/// bit. Layers over 1 MiB (real model geometries) are never kept, so a worker's memory stays what
/// its cache holds; the kept ones, at most 16 MiB, are dropped together when full.
enum RecentLayers {
    struct Key: Hashable {
        var geometry: ModelGeometry
        var preset: WorkloadPreset
        var layout: PromptLayout
        var decodeSteps: Int
        var seed: UInt64
        var index: Int
        var settings: TraceSettings
        var layer: Int
        var firstQueryRow: Int
    }

    typealias Layer = (prefill: LayerPrefill, decode: [DecodeStepInput])

    private static let maxLayerBytes = 1 << 20
    private static let maxBytes = 16 << 20
    private static let kept = Mutex<(layers: [Key: Layer], bytes: Int)>(([:], 0))

    static func find(_ key: Key) -> Layer? { kept.withLock { $0.layers[key] } }

    static func keep(_ layer: Layer, for key: Key) {
        let bytes = SequenceTrace.floats(in: layer) * MemoryLayout<Float>.stride
        guard bytes <= maxLayerBytes else { return }
        kept.withLock { kept in
            if kept.bytes + bytes > maxBytes { kept = ([:], 0) }
            kept.layers[key] = layer
            kept.bytes += bytes
        }
    }
}

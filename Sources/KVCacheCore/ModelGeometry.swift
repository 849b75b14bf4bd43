/// The shape of a decoder's KV cache: how many layers, how many query and key/value heads (GQA),
/// the head dimension, and how many tokens the model's vision tower emits per image.
public struct ModelGeometry: Sendable, Hashable, Codable {
    public var name: String
    public var layers: Int
    public var queryHeads: Int
    public var kvHeads: Int
    public var headDim: Int
    public var tokensPerImage: Int

    public init(
        name: String,
        layers: Int,
        queryHeads: Int,
        kvHeads: Int,
        headDim: Int,
        tokensPerImage: Int
    ) throws(KVCacheError) {
        self.name = name
        self.layers = layers
        self.queryHeads = queryHeads
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.tokensPerImage = tokensPerImage
        try validate()
    }

    /// Query heads per KV head; query head `h` reads KV head `h / groupSize`.
    public var groupSize: Int { queryHeads / kvHeads }

    /// Bytes of one key or value row in a storage type.
    public func rowBytes(_ scalar: ScalarType) -> Int { headDim * scalar.byteWidth }

    public func validate() throws(KVCacheError) {
        func require(_ ok: Bool, _ what: String) throws(KVCacheError) {
            if !ok { throw KVCacheError(.invalidGeometry, "model '\(name)': \(what)") }
        }
        try require(layers >= 1 && layers <= 512, "layers must be in 1...512, got \(layers)")
        try require(kvHeads >= 1 && kvHeads <= 256, "kvHeads must be in 1...256, got \(kvHeads)")
        try require(
            queryHeads >= kvHeads && queryHeads % kvHeads == 0,
            "queryHeads (\(queryHeads)) must be a positive multiple of kvHeads (\(kvHeads))"
        )
        try require(headDim >= 1 && headDim <= 1024, "headDim must be in 1...1024, got \(headDim)")
        try require(
            tokensPerImage >= 1 && tokensPerImage <= 16384,
            "tokensPerImage must be in 1...16384, got \(tokensPerImage)"
        )
    }
}

extension ModelGeometry {
    // The presets' fields are fixed and valid, so building them cannot fail.
    private static func preset(_ name: String, _ l: Int, _ hq: Int, _ hkv: Int, _ d: Int, _ img: Int) -> Self {
        // swiftlint:disable:next force_try
        try! ModelGeometry(name: name, layers: l, queryHeads: hq, kvHeads: hkv, headDim: d, tokensPerImage: img)
    }

    /// LLaVA-1.5-7B: Vicuna-7B (MHA) with CLIP ViT-L/14 at 336 px, 24x24 = 576 tokens per image.
    public static let llava15_7b = preset("llava-1.5-7b", 32, 32, 32, 128, 576)
    /// LLaVA-1.6 (NeXT) on Mistral-7B: GQA 32/8; "anyres" gives a variable count, 576 per tile.
    public static let llava16Mistral7b = preset("llava-1.6-mistral-7b", 32, 32, 8, 128, 576)
    /// Qwen2.5-VL-7B: 28 layers, GQA 28/4; tokens per image vary with resolution (448x448 -> 256).
    public static let qwen25VL7b = preset("qwen2.5-vl-7b", 28, 28, 4, 128, 256)
    /// A small geometry with GQA for tests and quick runs.
    public static let tiny = preset("tiny", 6, 4, 2, 32, 64)

    public static let presets: [ModelGeometry] = [llava15_7b, llava16Mistral7b, qwen25VL7b, tiny]

    public static func preset(named name: String) throws(KVCacheError) -> ModelGeometry {
        guard let found = presets.first(where: { $0.name == name }) else {
            throw KVCacheError(
                .unknownName,
                "unknown model '\(name)'; allowed: \(presets.map(\.name).joined(separator: ", "))"
            )
        }
        return found
    }
}

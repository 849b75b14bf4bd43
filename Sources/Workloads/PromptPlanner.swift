import KVCacheCore

/// Draws a prompt layout and a needle for one sequence.
enum PromptPlanner {
    /// The concrete preset of a sequence: `mixed` draws one by `WorkloadPreset.mixtureWeights`.
    static func concretePreset(_ preset: WorkloadPreset, rng: inout StructureRNG) -> WorkloadPreset {
        guard preset == .mixed else { return preset }
        var u = rng.uniform()
        for (candidate, weight) in WorkloadPreset.mixtureWeights {
            if u < weight { return candidate }
            u -= weight
        }
        return WorkloadPreset.mixtureWeights.last!.preset
    }

    /// The modality spans of one prompt. Every layout starts with text, so position 0 (the
    /// attention sink) is a BOS/system token as in every LLaVA-style prompt.
    static func spans(
        preset: WorkloadPreset,
        geometry: ModelGeometry,
        settings: TraceSettings,
        rng: inout StructureRNG
    ) -> [ModalitySpan] {
        var spans: [ModalitySpan] = []
        var next = 0
        func add(_ modality: Modality, _ count: Int) {
            spans.append(ModalitySpan(modality, start: next, count: count))
            next += count
        }
        func text(_ range: ClosedRange<Int>) -> Int {
            max(1, Int((Double(rng.int(in: range)) * settings.textScale).rounded()))
        }
        let imageTokens = geometry.tokensPerImage
        switch preset {
        case .imageQA, .mixed:
            add(.text, text(16...48))
            add(.image(0), imageTokens)
            add(.text, text(16...48))
        case .multiImage:
            let images = rng.int(in: settings.imagesPerRequest)
            for i in 0..<images {
                add(.text, text(8...24))
                add(.image(i), imageTokens)
            }
            add(.text, text(16...48))
        case .video:
            add(.text, text(16...32))
            // Pooled frames, as LLaVA-NeXT-Video's 144 tokens per frame against 576 per image.
            let frameTokens = max(1, imageTokens / 4)
            let frames = rng.int(in: settings.framesPerVideo)
            for i in 0..<frames { add(.videoFrame(i), frameTokens) }
            add(.text, text(16...48))
        case .document:
            add(.text, text(16...48))
            add(.image(0), imageTokens)
            add(.text, text(settings.documentTextTokens))
            add(.text, text(16...48))
        }
        return spans
    }

    /// Rows and columns of the patch grid a span of `tokens` visual tokens is laid out on (row-major).
    static func grid(tokens: Int) -> (width: Int, height: Int) {
        let width = Int(Double(tokens).squareRoot().rounded(.up))
        return (width, (tokens + width - 1) / width)
    }

    /// Where the needle goes: documents hide it in the long text; other presets in a patch block
    /// of one image or frame, or with `textNeedleProbability` in the text before the visual tokens.
    static func needle(
        preset: WorkloadPreset,
        layout: PromptLayout,
        geometry: ModelGeometry,
        settings: TraceSettings,
        model: ModelPlan,
        decodeSteps: Int,
        seed: UInt64
    ) -> Needle? {
        var rng = StructureRNG(seed: StreamKind.needle.seed(seed))
        let spans = layout.spans
        let v = layout.postVisionStart
        let wantsText = preset == .document || rng.bernoulli(settings.textNeedleProbability)
        let textLength = rng.int(in: 4...8)

        func textNeedle() -> (positions: [Int], modality: Modality)? {
            // Position 0 is the sink and never part of the needle.
            let candidates = spans.filter { span in
                guard span.modality == .text else { return false }
                let usable = span.start == 0 ? span.count - 1 : span.count
                return usable >= textLength + 1
                    && (preset == .document ? span.start >= v : span.end <= max(v, 1))
            }
            guard !candidates.isEmpty else { return nil }
            let span =
                preset == .document
                ? candidates.max { $0.count < $1.count }!
                : candidates[rng.int(below: candidates.count)]
            let first = max(span.start, 1)
            let start = first + rng.int(below: span.end - textLength - first + 1)
            return (Array(start..<start + textLength), .text)
        }

        func imageNeedle() -> (positions: [Int], modality: Modality)? {
            let visual = spans.filter(\.modality.isVisual)
            guard !visual.isEmpty else { return nil }
            let span = visual[rng.int(below: visual.count)]
            let (width, _) = grid(tokens: span.count)
            let fullRows = span.count / width
            let side = min(rng.int(in: 2...3), width, fullRows)
            guard side >= 2 else { return nil }
            let row = rng.int(below: fullRows - side + 1)
            let column = rng.int(below: width - side + 1)
            var positions: [Int] = []
            for y in row..<row + side {
                for x in column..<column + side { positions.append(span.start + y * width + x) }
            }
            return (positions, span.modality)
        }

        let placed = wantsText ? (textNeedle() ?? imageNeedle()) : (imageNeedle() ?? textNeedle())
        guard let (positions, modality) = placed else { return nil }

        let d = geometry.headDim
        let answers = settings.needleAnswerCount
        var codeStream = NormalStream(seed: rng.next())
        var codebook = codeStream.normals(answers * d)
        orthonormalize(&codebook, rows: answers, dimension: d)
        let answer = rng.int(below: answers)

        var probes: [NeedleProbe] = []
        for layer in 0..<geometry.layers {
            for head in 0..<geometry.queryHeads where model.isRetrieval(layer: layer, queryHead: head) {
                for step in 0..<decodeSteps where (step + 1) % settings.needleProbeInterval == 0 {
                    probes.append(NeedleProbe(layer: layer, queryHead: head, step: step))
                }
            }
        }
        return Needle(
            positions: positions,
            modality: modality,
            answer: answer,
            answerCount: answers,
            codebook: codebook,
            headDim: d,
            probes: probes
        )
    }

    /// Gram–Schmidt on the first `min(rows, dimension)` rows; every row ends with unit norm.
    private static func orthonormalize(_ rows: inout [Float], rows count: Int, dimension d: Int) {
        for i in 0..<count {
            if i < d {
                for j in 0..<i {
                    var projection: Float = 0
                    for c in 0..<d { projection += rows[i * d + c] * rows[j * d + c] }
                    for c in 0..<d { rows[i * d + c] -= projection * rows[j * d + c] }
                }
            }
            var norm: Float = 0
            for c in 0..<d { norm += rows[i * d + c] * rows[i * d + c] }
            let inverse = 1 / max(norm.squareRoot(), 1e-12)
            for c in 0..<d { rows[i * d + c] *= inverse }
        }
    }
}

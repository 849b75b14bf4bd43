import KVCacheCore

/// Expands one (sequence, layer) into tensors. Logit-space design (ALGORITHMS.md §1–§3 as
/// observations, see `TraceGenerator`):
///
/// - keys: content dims = text noise or a smooth 2-D image field, mixed with a positional AR(1)
///   vector; reserved axes near zero except the sink's, the needle's and each salient key's;
/// - queries: a random part and a positional part sized so that bulk logits are ~N(R·ρ^Δ, s²),
///   plus coefficients on reserved axes that put the sink and chosen keys at chosen logits;
/// - values: N(0, I), spatially smooth for images, the needle's code in retrieval KV heads.
struct LayerSynthesizer {
    let trace: SequenceTrace
    let layer: Int
    let space: HeadSpace
    let plan: LayerPlan

    private let m: Int
    private let v: Int
    private let d: Int
    private let dc: Int
    private let r: Int
    private let settings: TraceSettings

    init(trace: SequenceTrace, layer: Int) {
        precondition(
            (0..<trace.geometry.layers).contains(layer),
            "layer \(layer) is outside 0..<\(trace.geometry.layers)"
        )
        self.trace = trace
        self.layer = layer
        space = HeadSpace(headDim: trace.geometry.headDim)
        plan = LayerPlan(trace: trace, layer: layer, space: space)
        m = trace.layout.promptLength
        v = trace.layout.postVisionStart
        d = space.headDim
        dc = space.contentDims
        r = space.reservedDims
        settings = trace.settings
    }

    // MARK: Shared scales

    private var positionalKeyWeight: Float { Float(Synthesis.keyPositionalWeight) }
    private var textKeyNoiseWeight: Float {
        Float((1 - Synthesis.keyPositionalWeight * Synthesis.keyPositionalWeight).squareRoot())
    }
    private var recencyWeight: Double {
        QueryScales.positionalWeight(space: space, recency: settings.recencyLogitBoost)
    }

    /// Weights of field and noise in visual key content so that adjacent patches have the
    /// configured cosine (the positional part contributes c²·ρ of it).
    private var visualKeyWeights: (field: Float, noise: Float) {
        let c2 = Synthesis.keyPositionalWeight * Synthesis.keyPositionalWeight
        let reservedShare = Double(r) * Double(Synthesis.reservedNoise * Synthesis.reservedNoise) / Double(dc)
        let wanted = settings.imageNeighbourSimilarity * (1 + reservedShare) - c2 * settings.recencyCorrelation
        let field2 = min(1 - c2, max(0, wanted / Synthesis.fieldNeighbourCorrelation))
        return (Float(field2.squareRoot()), Float(max(0, 1 - c2 - field2).squareRoot()))
    }

    private var visualValueWeights: (field: Float, noise: Float) {
        let field2 = min(1, settings.imageNeighbourSimilarity / Synthesis.fieldNeighbourCorrelation)
        return (Float(field2.squareRoot()), Float((1 - field2).squareRoot()))
    }

    // MARK: Prefill

    /// The layer's keys, values and the queries of prompt rows `firstQueryRow..<m` (identical to
    /// those rows of a full prefill: the rows before are stepped over, not written).
    func prefill(firstQueryRow: Int = 0) -> LayerPrefill { prefillAndPositional(firstQueryRow: firstQueryRow).prefill }

    /// The prefill and the decode steps together: decode continues the positional process from the
    /// prefill's last prompt row instead of drawing the whole prompt's process again.
    func prefillAndDecode(firstQueryRow: Int = 0) -> (prefill: LayerPrefill, decode: [DecodeStepInput]) {
        let (prefill, lastPositional) = prefillAndPositional(firstQueryRow: firstQueryRow)
        return (prefill, decode(continuing: lastPositional))
    }

    /// The prefill, and every KV head's positional vector at the last prompt position (`dc` floats
    /// per head, heads back to back).
    private func prefillAndPositional(firstQueryRow: Int) -> (prefill: LayerPrefill, lastPositional: [Float]) {
        let geometry = trace.geometry
        let kvHeads = geometry.kvHeads
        let scratch = ScratchBuffers()
        // Every element of each tensor is written by its fill function, so the arrays start
        // uninitialised instead of being zeroed first.
        let positional = Self.floats(kvHeads * m * dc) { p in
            for kv in 0..<kvHeads { fillPositional(kvHead: kv, into: p + kv * m * dc) }
        }
        // Each KV head's arrays have room for the decode steps, which a cache that keeps the head
        // whole appends in place.
        func headArray(_ fill: (UnsafeMutablePointer<Float>) -> Void) -> [Float] {
            LayerPrefill.headArray(rows: m, spareRows: trace.decodeSteps, headDim: d, fill)
        }
        let keys = positional.withUnsafeBufferPointer { positional in
            (0..<kvHeads).map { kv in
                headArray { keys in
                    fillKeys(
                        kvHead: kv,
                        positional: positional.baseAddress! + kv * m * dc,
                        into: keys,
                        scratch: scratch
                    )
                }
            }
        }
        let values = (0..<kvHeads).map { kv in
            headArray { values in fillValues(kvHead: kv, into: values, scratch: scratch) }
        }
        let first = min(max(0, firstQueryRow), m)
        let rows = m - first
        let queries = positional.withUnsafeBufferPointer { positional in
            Self.floats(geometry.queryHeads * rows * d) { queries in
                // Without query rows (a policy that observes none) the rows' draws are not needed.
                for head in 0..<(rows > 0 ? geometry.queryHeads : 0) {
                    let kv = head / geometry.groupSize
                    keys[kv].withUnsafeBufferPointer { keys in
                        fillQueries(
                            head: head,
                            keys: keys.baseAddress!,
                            positional: positional.baseAddress! + kv * m * dc,
                            from: first,
                            into: queries + head * rows * d
                        )
                    }
                }
            }
        }
        var lastPositional: [Float] = []
        lastPositional.reserveCapacity(kvHeads * dc)
        for kv in 0..<kvHeads {
            let last = (kv * m + m - 1) * dc
            lastPositional += positional[last..<(last + dc)]
        }
        do {
            // Finite by construction (finite normals, scaled and summed), so not scanned again.
            let prefill = try LayerPrefill(
                geometry: geometry,
                promptLength: m,
                keys: keys,
                values: values,
                queries: queries,
                queryRows: rows,
                checkedFinite: true
            )
            return (prefill, lastPositional)
        } catch {
            preconditionFailure("synthesised prefill of layer \(layer) is malformed: \(error)")
        }
    }

    /// An array of `count` floats that `fill` writes completely.
    private static func floats(_ count: Int, _ fill: (UnsafeMutablePointer<Float>) -> Void) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if let base = buffer.baseAddress { fill(base) }
            initialized = count
        }
    }

    /// p_0 ~ N(0, I), p_j = ρ·p_{j−1} + √(1−ρ²)·e_j over the content dims.
    private func fillPositional(kvHead: Int, into p: UnsafeMutablePointer<Float>) {
        var stream = NormalStream(seed: StreamKind.positional.seed(trace.seed, layer, kvHead))
        stream.fill(p, count: m * dc)
        let rho = Float(settings.recencyCorrelation)
        let innovation = Float((1 - settings.recencyCorrelation * settings.recencyCorrelation).squareRoot())
        var j = 1
        while j < m {
            let row = p + j * dc
            let previous = row - dc
            for c in 0..<dc { row[c] = rho * previous[c] + innovation * row[c] }
            j += 1
        }
    }

    private func fillKeys(
        kvHead kv: Int,
        positional p: UnsafePointer<Float>,
        into keys: UnsafeMutablePointer<Float>,
        scratch: ScratchBuffers
    ) {
        var stream = NormalStream(seed: StreamKind.keyNoise.seed(trace.seed, layer, kv))
        let noise = scratch.buffer(.contentNoise, count: m * dc)
        stream.fill(noise, count: m * dc)
        let reservedNoise = scratch.buffer(.reservedNoise, count: m * r)
        stream.fill(reservedNoise, count: m * r)

        let c = positionalKeyWeight
        let textWeight = textKeyNoiseWeight
        let sigma = Synthesis.reservedNoise
        let tags = trace.layout.tags
        for j in 0..<m {
            let row = keys + j * d
            if !tags[j].isVisual {  // visual rows' content is written with their field below
                let n = noise + j * dc
                let pj = p + j * dc
                for k in 0..<dc { row[k] = textWeight * n[k] + c * pj[k] }
            }
            let reserved = reservedNoise + j * r
            for k in 0..<r { row[dc + k] = sigma * reserved[k] }
        }

        let (fieldWeight, noiseWeight) = visualKeyWeights
        forEachVisualField(dims: dc, stream: &stream, scratch: scratch) { span, field in
            for i in 0..<span.count {
                let j = span.start + i
                let row = keys + j * d
                let n = noise + j * dc
                let pj = p + j * dc
                let f = field + i * dc
                for k in 0..<dc { row[k] = fieldWeight * f[k] + noiseWeight * n[k] + c * pj[k] }
            }
        }

        let amplitude = space.axisAmplitude
        func mark(_ position: Int, axis: Int, contentScale: Float) {
            let row = keys + position * d
            for k in 0..<dc { row[k] *= contentScale }
            row[axis] += amplitude
        }
        // The sink's logit sets every row's threshold, so its key carries almost nothing but its axis.
        for k in 0..<r { keys[dc + k] = 0 }
        mark(0, axis: space.sinkAxis, contentScale: Synthesis.sinkContentScale)
        for key in plan.coded[kv] {
            mark(key.position, axis: key.axis, contentScale: Float(Synthesis.codedContentScale))
        }
        if plan.needleCarriers[kv], let needle = trace.needle {
            for position in needle.positions {
                mark(position, axis: space.needleAxis, contentScale: Float(Synthesis.codedContentScale))
            }
        }
    }

    private func fillValues(kvHead kv: Int, into values: UnsafeMutablePointer<Float>, scratch: ScratchBuffers) {
        var stream = NormalStream(seed: StreamKind.valueNoise.seed(trace.seed, layer, kv))
        stream.fill(values, count: m * d)
        let (fieldWeight, noiseWeight) = visualValueWeights
        forEachVisualField(dims: d, stream: &stream, scratch: scratch) { span, field in
            let base = values + span.start * d
            for i in 0..<span.count * d { base[i] = fieldWeight * field[i] + noiseWeight * base[i] }
        }
        for k in 0..<d { values[k] *= Synthesis.sinkValueScale }
        if plan.needleCarriers[kv], let needle = trace.needle {
            let gain = Float(settings.needleValueGain) * Float(d).squareRoot()
            needle.codebook.withUnsafeBufferPointer { codes in
                let code = codes.baseAddress! + needle.answer * d
                for position in needle.positions {
                    let row = values + position * d
                    for k in 0..<d { row[k] += gain * code[k] }
                }
            }
        }
    }

    /// Generates a smooth unit-variance field for every visual span in prompt order and hands it
    /// to `body` (`span.count × dims` floats). Consecutive video frames are chained so that each
    /// frame correlates with the previous one.
    private func forEachVisualField(
        dims: Int,
        stream: inout NormalStream,
        scratch: ScratchBuffers,
        _ body: (ModalitySpan, UnsafePointer<Float>) -> Void
    ) {
        var previousFrameTokens = -1
        let keep = Float(settings.frameCorrelation.squareRoot())
        let fresh = Float((1 - settings.frameCorrelation).squareRoot())
        for span in trace.layout.spans where span.modality.isVisual {
            let field = scratch.buffer(.field, count: span.count * dims)
            SpatialField.generate(tokens: span.count, dims: dims, stream: &stream, scratch: scratch, into: field)
            if case .videoFrame = span.modality {
                let previous = scratch.buffer(.previousFrame, count: span.count * dims)
                if previousFrameTokens == span.count {
                    for i in 0..<span.count * dims { field[i] = keep * previous[i] + fresh * field[i] }
                }
                previous.update(from: field, count: span.count * dims)
                previousFrameTokens = span.count
            } else {
                previousFrameTokens = -1
            }
            body(span, field)
        }
    }

    /// The query rows `first..<m` of `head` (row `first` at `queries`); the random draws of the rows
    /// before are still made, so every written row is the same as in a full prefill.
    private func fillQueries(
        head: Int,
        keys: UnsafePointer<Float>,
        positional p: UnsafePointer<Float>,
        from first: Int,
        into queries: UnsafeMutablePointer<Float>
    ) {
        var stream = NormalStream(seed: StreamKind.queryNoise.seed(trace.seed, layer, head))
        // The noise of rows first..<m.
        let z = [Float](unsafeUninitializedCapacity: (m - first) * dc) { buffer, count in
            if let base = buffer.baseAddress { stream.fill(base, range: (first * dc)..<(m * dc)) }
            count = (m - first) * dc
        }
        var targetsRNG = StructureRNG(seed: StreamKind.rowTargets.seed(trace.seed, layer, head))
        let tags = trace.layout.tags
        let recency = recencyWeight
        let postVisionRandom = Float(
            QueryScales.randomWeight(space: space, spread: plan.bulkLogitStd, positionalWeight: recency)
        )
        let preVisionRandom = Float(
            QueryScales.randomWeight(
                space: space,
                spread: Synthesis.preVisionLogitStd,
                positionalWeight: recency
            )
        )
        let ratio = (Double(d) / Double(dc)).squareRoot()
        let visualRandom = Float(Synthesis.visualLogitStd * ratio)
        let visualSelf = Float(Synthesis.visualSelfLogit * Double(d).squareRoot() / Double(dc))
        let positionalWeight = Float(recency)
        let salient = plan.salient[head]
        let isRetrieval = plan.retrieval[head]
        let needlePositions = trace.needle?.positions ?? []
        var targets = TargetScratch(capacity: salient.count)
        var visibleSalient = 0
        var visibleNeedle = 0
        let marked = plan.markedPositions[head / trace.geometry.groupSize]
        var visibleMarked = 0

        z.withUnsafeBufferPointer { z in
            for q in 0..<m {
                let written = q >= first
                let row = queries + (q - first) * d
                let zq = z.baseAddress! + (q - first) * dc
                let pq = p + q * dc
                if written { (row + dc).update(repeating: 0, count: r) }
                if q >= v {
                    // The targets' draws are made for every row, written or not.
                    while visibleSalient < salient.count && salient[visibleSalient].position <= q {
                        visibleSalient += 1
                    }
                    while visibleNeedle < needlePositions.count && needlePositions[visibleNeedle] <= q {
                        visibleNeedle += 1
                    }
                    targets.reset()
                    chooseTargets(
                        from: salient,
                        visible: visibleSalient,
                        causalCount: q + 1,
                        rng: &targetsRNG,
                        into: &targets
                    )
                    if isRetrieval && visibleNeedle > 0 {
                        // The question refers to the needle, so retrieval heads look at it here too.
                        targets.needle(
                            count: visibleNeedle,
                            gap: targetsRNG.uniform(in: settings.needleGap),
                            plan.calibrator
                        )
                    }
                    while visibleMarked < marked.count && marked[visibleMarked] <= q { visibleMarked += 1 }
                    guard written else { continue }
                    for k in 0..<dc { row[k] = postVisionRandom * zq[k] + positionalWeight * pq[k] }
                    writeTargets(targets, causalCount: q + 1, visibleMarked: visibleMarked, into: row)
                } else if !written {
                    continue
                } else if tags[q].isVisual {
                    let key = keys + q * d
                    for k in 0..<dc { row[k] = visualRandom * zq[k] + visualSelf * key[k] }
                    row[space.sinkAxis] = Synthesis.visualSinkLogit
                } else {
                    for k in 0..<dc { row[k] = preVisionRandom * zq[k] + positionalWeight * pq[k] }
                    row[space.sinkAxis] = Synthesis.preVisionSinkLogit
                }
            }
        }
    }

    /// A random subset of the visible salient keys, sized to `salientShareOfDense` of the row's
    /// expected above-threshold entries, at random gaps below the sink.
    private func chooseTargets(
        from salient: [CodedKey],
        visible: Int,
        causalCount n: Int,
        rng: inout StructureRNG,
        into targets: inout TargetScratch
    ) {
        guard visible > 0 else { return }
        let wanted = Int((settings.salientShareOfDense * plan.calibrator.density * Double(n)).rounded())
        let count = min(max(wanted, 1), visible)
        targets.pickSubset(of: visible, count: count, rng: &rng)
        for i in 0..<count {
            targets.add(
                axis: salient[targets.index(i)].axis,
                gap: rng.uniform(in: settings.salientGap),
                plan.calibrator
            )
        }
    }

    /// Sets the reserved axes of a query row: the sink at the calibrated M, targets below it.
    private func writeTargets(
        _ targets: TargetScratch,
        causalCount n: Int,
        visibleMarked: Int,
        into row: UnsafeMutablePointer<Float>
    ) {
        let sink = plan.calibrator.sinkLogit(
            causalCount: n,
            targetCount: targets.totalTargets,
            inertCount: max(0, visibleMarked - targets.totalTargets),
            expectedDenseTargets: targets.expectedDense
        )
        row[space.sinkAxis] = Float(sink)
        for (axis, gap) in targets.aimed { row[axis] = Float(sink - gap) }
        if let gap = targets.needleGap { row[space.needleAxis] = Float(sink - gap) }
    }

    // MARK: Decode

    /// The decode steps, drawing the prompt's positional process to find where they continue it.
    func decode() -> [DecodeStepInput] {
        guard trace.decodeSteps > 0 else { return [] }
        var lastPositional = [Float](repeating: 0, count: trace.geometry.kvHeads * dc)
        var prompt = [Float](repeating: 0, count: m * dc)
        prompt.withUnsafeMutableBufferPointer { prompt in
            for kv in 0..<trace.geometry.kvHeads {
                fillPositional(kvHead: kv, into: prompt.baseAddress!)
                for k in 0..<dc { lastPositional[kv * dc + k] = prompt[(m - 1) * dc + k] }
            }
        }
        return decode(continuing: lastPositional)
    }

    /// The decode steps, each KV head's positional process continuing from `lastPositional`.
    private func decode(continuing lastPositional: [Float]) -> [DecodeStepInput] {
        let steps = trace.decodeSteps
        guard steps > 0 else { return [] }
        let geometry = trace.geometry
        let kvHeads = geometry.kvHeads
        let queryHeads = geometry.queryHeads
        var positions = lastPositional

        let perStepKV = 2 * dc + r + d
        let kvNoise = (0..<kvHeads).map { kv in
            var stream = NormalStream(seed: StreamKind.decodeKeysValues.seed(trace.seed, layer, kv))
            return stream.normals(steps * perStepKV)
        }
        let queryNoise = (0..<queryHeads).map { head in
            var stream = NormalStream(seed: StreamKind.decodeQueries.seed(trace.seed, layer, head))
            return stream.normals(steps * dc)
        }
        var targetRNGs = (0..<queryHeads).map {
            StructureRNG(seed: StreamKind.decodeTargets.seed(trace.seed, layer, $0))
        }

        let rho = Float(settings.recencyCorrelation)
        let innovation = Float((1 - settings.recencyCorrelation * settings.recencyCorrelation).squareRoot())
        let c = positionalKeyWeight
        let textWeight = textKeyNoiseWeight
        let recency = recencyWeight
        let randomWeight = Float(
            QueryScales.randomWeight(space: space, spread: plan.bulkLogitStd, positionalWeight: recency)
        )
        let positionalWeight = Float(recency)
        let needle = trace.needle
        let probeInterval = settings.needleProbeInterval
        var targets = TargetScratch(capacity: plan.salient.map(\.count).max() ?? 0)
        var result: [DecodeStepInput] = []
        result.reserveCapacity(steps)

        for t in 0..<steps {
            var keys = [Float](repeating: 0, count: kvHeads * d)
            var values = [Float](repeating: 0, count: kvHeads * d)
            var queries = [Float](repeating: 0, count: queryHeads * d)
            for kv in 0..<kvHeads {
                kvNoise[kv].withUnsafeBufferPointer { noise in
                    let base = noise.baseAddress! + t * perStepKV
                    let innovations = base
                    let content = base + dc
                    let reserved = base + 2 * dc
                    let value = base + 2 * dc + r
                    for k in 0..<dc {
                        let next = rho * positions[kv * dc + k] + innovation * innovations[k]
                        positions[kv * dc + k] = next
                        keys[kv * d + k] = textWeight * content[k] + c * next
                    }
                    for k in 0..<r { keys[kv * d + dc + k] = Synthesis.reservedNoise * reserved[k] }
                    for k in 0..<d { values[kv * d + k] = value[k] }
                }
            }
            let n = m + t + 1
            queries.withUnsafeMutableBufferPointer { queries in
                for head in 0..<queryHeads {
                    let kv = head / geometry.groupSize
                    let row = queries.baseAddress! + head * d
                    queryNoise[head].withUnsafeBufferPointer { z in
                        for k in 0..<dc {
                            row[k] = randomWeight * z[t * dc + k] + positionalWeight * positions[kv * dc + k]
                        }
                    }
                    targets.reset()
                    if plan.retrieval[head], let needle, (t + 1) % probeInterval == 0 {
                        // A probe step: the token being generated is the answer, read from the needle.
                        targets.needle(
                            count: needle.positions.count,
                            gap: targetRNGs[head].uniform(in: settings.needleGap),
                            plan.calibrator
                        )
                    } else {
                        chooseDecodeTargets(
                            head: head,
                            kvHead: kv,
                            causalCount: n,
                            rng: &targetRNGs[head],
                            into: &targets
                        )
                    }
                    writeTargets(targets, causalCount: n, visibleMarked: plan.markedPositions[kv].count, into: row)
                }
            }
            do {
                result.append(try DecodeStepInput(geometry: geometry, keys: keys, values: values, queries: queries))
            } catch {
                preconditionFailure("synthesised decode step \(t) of layer \(layer) is malformed: \(error)")
            }
        }
        return result
    }

    /// Each target comes from the head's prefill salient set with probability `decodeAgreement`,
    /// otherwise from its KV head's decode-only keys, so post-vision attention predicts decode
    /// attention well but not perfectly.
    private func chooseDecodeTargets(
        head: Int,
        kvHead: Int,
        causalCount n: Int,
        rng: inout StructureRNG,
        into targets: inout TargetScratch
    ) {
        let salient = plan.salient[head]
        let others = plan.decodeOnly[kvHead]
        let available = salient.count + others.count
        guard available > 0 else { return }
        let wanted = Int((settings.salientShareOfDense * plan.calibrator.density * Double(n)).rounded())
        let count = min(max(wanted, 1), available)
        var fromSalient = 0
        var fromOthers = 0
        for _ in 0..<count {
            let preferSalient = rng.bernoulli(settings.decodeAgreement)
            if (preferSalient && fromSalient < salient.count) || fromOthers == others.count {
                fromSalient += 1
            } else {
                fromOthers += 1
            }
        }
        targets.pickSubset(of: salient.count, count: fromSalient, rng: &rng)
        for i in 0..<fromSalient {
            targets.add(
                axis: salient[targets.index(i)].axis,
                gap: rng.uniform(in: settings.salientGap),
                plan.calibrator
            )
        }
        targets.pickSubset(of: others.count, count: fromOthers, rng: &rng)
        for i in 0..<fromOthers {
            targets.add(axis: others[targets.index(i)].axis, gap: rng.uniform(in: settings.salientGap), plan.calibrator)
        }
    }
}

/// Per-row target bookkeeping, reused across rows to avoid allocation.
private struct TargetScratch {
    var aimed: [(axis: Int, gap: Double)] = []
    var needleGap: Double?
    var totalTargets = 0
    var expectedDense = 0.0
    private var indices: [Int32] = []

    init(capacity: Int) {
        aimed.reserveCapacity(capacity)
        indices.reserveCapacity(capacity)
    }

    mutating func reset() {
        aimed.removeAll(keepingCapacity: true)
        needleGap = nil
        totalTargets = 0
        expectedDense = 0
    }

    mutating func add(axis: Int, gap: Double, _ calibrator: SinkCalibrator) {
        aimed.append((axis, gap))
        totalTargets += 1
        expectedDense += calibrator.denseProbability(gap: gap)
    }

    mutating func needle(count: Int, gap: Double, _ calibrator: SinkCalibrator) {
        needleGap = gap
        totalTargets += count
        expectedDense += Double(count) * calibrator.denseProbability(gap: gap)
    }

    /// Leaves a uniform random `count`-subset of `0..<total` at `index(0..<count)`.
    mutating func pickSubset(of total: Int, count: Int, rng: inout StructureRNG) {
        indices.removeAll(keepingCapacity: true)
        for i in 0..<total { indices.append(Int32(i)) }
        indices.withUnsafeMutableBufferPointer { rng.partialShuffle($0, count: total, take: count) }
    }

    func index(_ i: Int) -> Int { Int(indices[i]) }
}

import KVKernels

/// A layer's key and value rows in Float32, with LOOK-M's merging applied in place to the kept ones.
struct MergedRows {
    let prefill: LayerPrefill
    /// Rows that merging changed, by head and position; untouched rows are read from the prefill.
    private var changedKeys: [[Int: [Float]]]
    private var changedValues: [[Int: [Float]]]

    init(prefill: LayerPrefill) {
        self.prefill = prefill
        changedKeys = Array(repeating: [:], count: prefill.geometry.kvHeads)
        changedValues = changedKeys
    }

    /// Whether merging left every row of `head` as the prefill has it.
    func isUnchanged(head: Int) -> Bool { changedKeys[head].isEmpty && changedValues[head].isEmpty }

    /// Calls `body` with the key and value rows of `head` at the ascending positions `kept`: one call
    /// per run of consecutive positions that merging left unchanged (read in place from the prefill,
    /// so a head kept whole is one call), and one per changed row.
    func forEachRun(
        head: Int,
        of kept: [Int],
        _ body: (Range<Int>, UnsafeBufferPointer<Float>, UnsafeBufferPointer<Float>) -> Void
    ) {
        let changedKeys = changedKeys[head]
        let changedValues = changedValues[head]
        let d = prefill.geometry.headDim
        /// The elements of `positions`' rows in the head's keys and values.
        func elements(_ positions: Range<Int>) -> Range<Int> {
            (positions.lowerBound * d)..<(positions.upperBound * d)
        }
        prefill.keys[head].withUnsafeBufferPointer { keys in
            prefill.values[head].withUnsafeBufferPointer { values in
                func original(_ positions: Range<Int>) {
                    let rows = elements(positions)
                    body(
                        positions,
                        UnsafeBufferPointer(rebasing: keys[rows]),
                        UnsafeBufferPointer(rebasing: values[rows])
                    )
                }
                func either(
                    _ changed: [Float]?,
                    _ original: UnsafeBufferPointer<Float>,
                    row: Int,
                    _ next: (UnsafeBufferPointer<Float>) -> Void
                ) {
                    if let changed {
                        changed.withUnsafeBufferPointer(next)
                    } else {
                        next(UnsafeBufferPointer(rebasing: original[elements(row..<(row + 1))]))
                    }
                }
                var run: Range<Int>?
                for j in kept {
                    if changedKeys[j] != nil || changedValues[j] != nil {
                        if let pending = run { original(pending) }
                        run = nil
                        either(changedKeys[j], keys, row: j) { key in
                            either(changedValues[j], values, row: j) { value in body(j..<(j + 1), key, value) }
                        }
                    } else if let pending = run, pending.upperBound == j {
                        run = pending.lowerBound..<(j + 1)
                    } else {
                        if let pending = run { original(pending) }
                        run = j..<(j + 1)
                    }
                }
                if let pending = run { original(pending) }
            }
        }
    }

    /// LOOK-M Eq. 9–12: every evicted row joins the kept row whose key is most cosine-similar, and each
    /// kept row becomes the mean of itself and its (mode-transformed) joiners; with `.values` only its
    /// value does. Returns rows merged.
    mutating func merge(kept: [[Int]], mode: LookMSettings.Merge, filterBelowMean: Bool) -> Int {
        let g = prefill.geometry
        let m = prefill.promptLength
        let d = g.headDim
        struct Match {
            var evicted: Int
            var pivot: Int
            var similarity: Float
        }
        var matches: [[Match]] = []
        // Similarities as tiles of evicted rows against the packed kept keys (`kvk_scores`), one head
        // at a time; each evicted row then takes the first kept row of highest similarity.
        let tileRows = AttentionProfile.tileRows
        let largestKept = kept.map(\.count).max() ?? 0
        let stride = kvk_packed_floats(largestKept, 1)
        let packed = UnsafeMutablePointer<Float>.allocate(capacity: kvk_packed_floats(largestKept, d))
        let gathered = UnsafeMutablePointer<Float>.allocate(capacity: tileRows * d)
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: tileRows * stride)
        defer {
            packed.deallocate()
            gathered.deallocate()
            scores.deallocate()
        }
        for h in 0..<g.kvHeads {
            prefill.keys[h].withUnsafeBufferPointer { keys in
                let headKeys = keys.baseAddress!
                var inverseNorm = [Float](repeating: 0, count: m)
                for j in 0..<m {
                    let row = headKeys + j * d
                    inverseNorm[j] = 1 / max(Kernels.dot(row, row, count: d).squareRoot(), 1e-12)
                }
                let pivots = kept[h]
                var isKept = [Bool](repeating: false, count: m)
                for c in pivots { isKept[c] = true }
                let evicted = (0..<m).filter { !isKept[$0] }
                var headMatches: [Match] = []
                if !pivots.isEmpty {
                    kvk_pack_keys(headKeys, d, pivots, pivots.count, packed)
                    for tileStart in Swift.stride(from: 0, to: evicted.count, by: tileRows) {
                        let rows = min(tileRows, evicted.count - tileStart)
                        for r in 0..<rows {
                            (gathered + r * d).update(from: headKeys + evicted[tileStart + r] * d, count: d)
                        }
                        kvk_scores(gathered, d, rows, packed, pivots.count, d, 1, 0, scores, stride)
                        for r in 0..<rows {
                            let e = evicted[tileStart + r]
                            let dots = scores + r * stride
                            var best = Match(evicted: e, pivot: -1, similarity: -.infinity)
                            for (i, c) in pivots.enumerated() {
                                let similarity = dots[i] * inverseNorm[e] * inverseNorm[c]
                                if similarity > best.similarity {
                                    best = Match(evicted: e, pivot: c, similarity: similarity)
                                }
                            }
                            if best.pivot >= 0 { headMatches.append(best) }
                        }
                    }
                }
                matches.append(headMatches)
            }
        }
        if filterBelowMean, mode == .averaged || mode == .weighted {
            // The official code drops evicted tokens whose head-averaged best similarity is below the
            // layer's mean; they are evicted without merging.
            var sum = [Float](repeating: 0, count: m)
            var count = [Int](repeating: 0, count: m)
            var total: Float = 0
            var pairs = 0
            for match in matches.joined() {
                sum[match.evicted] += match.similarity
                count[match.evicted] += 1
                total += match.similarity
                pairs += 1
            }
            let mean = total / Float(max(1, pairs))
            matches = matches.map { $0.filter { sum[$0.evicted] / Float(count[$0.evicted]) >= mean } }
        }
        for h in 0..<g.kvHeads {
            prefill.keys[h].withUnsafeBufferPointer { keys in
                prefill.values[h].withUnsafeBufferPointer { values in
                    // Per pivot: running sums of key and value rows, seeded with the pivot itself, in
                    // flat rows by the order pivots are first matched.
                    var slot = [Int: Int]()
                    var pivots: [Int] = []
                    var joined: [Int] = []
                    var keySums: [Float] = []
                    var valueSums: [Float] = []
                    let keyBase = keys.baseAddress!
                    let valueBase = values.baseAddress!
                    for match in matches[h] where slot[match.pivot] == nil {
                        slot[match.pivot] = pivots.count
                        pivots.append(match.pivot)
                        joined.append(0)
                        keySums.append(contentsOf: UnsafeBufferPointer(start: keyBase + match.pivot * d, count: d))
                        valueSums.append(contentsOf: UnsafeBufferPointer(start: valueBase + match.pivot * d, count: d))
                    }
                    keySums.withUnsafeMutableBufferPointer { keySums in
                        valueSums.withUnsafeMutableBufferPointer { valueSums in
                            for match in matches[h] {
                                let s = slot[match.pivot]!
                                joined[s] += 1
                                let keyX = keyBase + match.pivot * d
                                let valueX = valueBase + match.pivot * d
                                let keyY = keyBase + match.evicted * d
                                let valueY = valueBase + match.evicted * d
                                let keySum = keySums.baseAddress! + s * d
                                let valueSum = valueSums.baseAddress! + s * d
                                for c in 0..<d {
                                    switch mode {
                                    case .averaged, .none:
                                        keySum[c] += keyY[c]
                                        valueSum[c] += valueY[c]
                                    case .pivotal:
                                        keySum[c] += (keyY[c] + keyX[c]) / 2
                                        valueSum[c] += (valueY[c] + valueX[c]) / 2
                                    case .values:
                                        valueSum[c] += (valueY[c] + valueX[c]) / 2
                                    case .weighted:
                                        keySum[c] += match.similarity * keyY[c]
                                        valueSum[c] += match.similarity * valueY[c]
                                    }
                                }
                            }
                        }
                    }
                    for (s, x) in pivots.enumerated() {
                        let scale = 1 / Float(joined[s] + 1)
                        if mode != .values {
                            changedKeys[h][x] = keySums[(s * d)..<((s + 1) * d)].map { $0 * scale }
                        }
                        changedValues[h][x] = valueSums[(s * d)..<((s + 1) * d)].map { $0 * scale }
                    }
                }
            }
        }
        return matches.reduce(0) { $0 + $1.count }
    }
}

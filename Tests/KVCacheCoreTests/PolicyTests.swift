import Testing

@testable import KVCacheCore

/// Hand-worked cases: each expected kept set, schedule or row can be computed on paper.
@Suite struct PolicyTests {
    @Test func topKPrefersHigherScoreThenLowerPosition() {
        let scores: [Float] = [0.1, 0.5, 0.5, 0.9, 0.2, 0.5]
        #expect(Selection.top(3, of: scores, among: Array(0..<6)) == [1, 2, 3])
        #expect(Selection.top(2, of: scores, among: [0, 2, 4, 5]) == [2, 5])
        #expect(Selection.top(0, of: scores, among: Array(0..<6)) == [])
        #expect(Selection.top(9, of: scores, among: [5, 1]) == [1, 5])
    }

    @Test func averagePoolingCountsPaddedZeros() {
        let pooled = Selection.pool([3, 3, 3, 3, 3][...], kernel: 3, mode: .average)
        #expect(pooled == [2, 3, 3, 3, 2])
        #expect(Selection.pool([1, 5, 2, 0][...], kernel: 3, mode: .max) == [5, 5, 5, 2])
    }

    @Test func streamingLLMKeepsSinksAndRecent() throws {
        let g = geometry(layers: 1, queryHeads: 2, kvHeads: 1, headDim: 16)
        let m = 20
        let l = layout(m: m, textBefore: 4, visual: 8)
        let prefill = randomPrefill(g, m: m, seed: 1)
        let result = try LayerCompressor.compress(
            prefill,
            layout: l,
            profile: nil,
            budget: LayerBudget(layer: 0, heads: [HeadBudget(capacity: 8)]),
            policy: .streamingLLM(.init()),
            as: Float.self
        )
        #expect(result.heads[0].positions == [0, 1, 2, 3, 16, 17, 18, 19])
        #expect(result.heads[0].tags[4] == .text)
    }

    /// H2O at budget 4 with recent share 0.5: two recent positions, then the two largest column sums.
    @Test func h2oKeepsHeavyHittersAndRecent() throws {
        let g = geometry(layers: 1, queryHeads: 1, kvHeads: 1, headDim: 16)
        let m = 10
        let prefill = randomPrefill(g, m: m, seed: 3)
        let l = layout(m: m, textBefore: 2, visual: 4)
        let profile = try AttentionProfile(prefill: prefill, requirements: ProfileRequirements(suffixStarts: [0]))
        let sums = profile.columnSums[0]!
        let heavy = Array(0..<8).sorted { sums[$0] != sums[$1] ? sums[$0] > sums[$1] : $0 < $1 }.prefix(2).sorted()
        let result = try LayerCompressor.compress(
            prefill,
            layout: l,
            profile: profile,
            budget: LayerBudget(layer: 0, heads: [HeadBudget(capacity: 4)]),
            policy: .h2o(.init()),
            as: Float.self
        )
        #expect(result.heads[0].positions.map(Int.init) == heavy + [8, 9])
    }

    /// C = 200, w = 32, β = 20: min 8.4, max 327.6, step 106.4 → tops 328, 221, 115, 8.
    @Test func pyramidScheduleIsLinearAndAveragesTheBudget() {
        let capacities = BudgetAllocator.pyramid(m: 1000, layers: 4, retention: 0.2, settings: .init())
        #expect(capacities == [360, 253, 147, 40])
        #expect(capacities.reduce(0, +) == 800)
    }

    @Test func pyramidClampsToThePromptAndFallsBackBelowTheWindow() {
        // C = 900 for m = 1000: max would exceed m − w, so it is clamped and min recomputed.
        let clamped = BudgetAllocator.pyramid(m: 1000, layers: 3, retention: 0.9, settings: .init())
        #expect(clamped.first == 1000)
        #expect(clamped.reduce(0, +) == 2700)
        // C = 20 < w = 32: SnapKV's uniform budget.
        #expect(BudgetAllocator.pyramid(m: 100, layers: 3, retention: 0.2, settings: .init()) == [20, 20, 20])
    }

    /// Densities 1, 0.5, 0.01, 0.01 at α = 0.5 over 100 tokens: β = d/Σd·α·L = 1.316, 0.658, 0.013, 0.013,
    /// clipped to [0.01, 1] and not renormalised (the paper), or water-filled to exactly 200.
    @Test func vlCacheClipsLayerFractions() throws {
        let stats = [1, 0.5, 0.01, 0.01].enumerated().map {
            LayerStatistics(layer: $0.offset, promptLength: 100, density: $0.element, heads: [])
        }
        let g = geometry(layers: 4, queryHeads: 2, kvHeads: 1)
        let clipped = try BudgetAllocator.allocate(
            policy: .vlCache(.init()),
            retention: 0.5,
            geometry: g,
            statistics: stats
        )
        #expect(clipped.map(\.total) == [100, 66, 1, 1])
        var exact = VLCacheSettings()
        exact.apportionment = .largestRemainder
        let filled = try BudgetAllocator.allocate(
            policy: .vlCache(exact),
            retention: 0.5,
            geometry: g,
            statistics: stats
        )
        #expect(filled.map(\.total) == [100, 96, 2, 2])
    }

    /// Three layers, one head, m = 100, α = 0.2 → 60 rows in all; window 4 is also the floor.
    /// Wants: 4 + 20 + 10 = 34, 4 + 5 + 3 = 12, 4 + 2 + 2 = 8 (54 in all).
    static func madaStatistics() -> [LayerStatistics] {
        func head(_ v: Int, _ t: Int) -> HeadModalityStatistics {
            HeadModalityStatistics(
                visualMass: Double(v),
                textMass: Double(t),
                visualDemand: v,
                textDemand: t,
                jointDemand: v + t,
                visualCount: 60,
                textCount: 36
            )
        }
        return [head(20, 10), head(5, 3), head(2, 2)].enumerated().map {
            LayerStatistics(layer: $0.offset, promptLength: 100, density: 1, heads: [$0.element])
        }
    }

    /// Keep-demand reading: layer 0 keeps 34 (cap 52), layer 1 keeps 12 (cap 22), the last takes 14.
    @Test func madaKVKeepDemandCompensationSumsToTheTotal() throws {
        var settings = MadaKVSettings()
        settings.proxyWindow = 4
        settings.compensation = .keepDemand
        let budgets = try BudgetAllocator.allocate(
            policy: .madaKV(settings),
            retention: 0.2,
            geometry: geometry(layers: 3, queryHeads: 1, kvHeads: 1),
            statistics: Self.madaStatistics()
        )
        #expect(budgets.map(\.total) == [34, 12, 14])
        #expect(budgets[0].heads[0].split == ModalitySplit(visual: 20, text: 10))
        #expect(budgets[1].heads[0].split == ModalitySplit(visual: 5, text: 3))
        #expect(budgets[2].heads[0].split == ModalitySplit(visual: 5, text: 5))
    }

    /// Proportional compensation: 34·60/54 = 37.8 → 38; then 12·22/20 = 13.2 → 13; the last takes 9.
    /// Splits follow the modality masses (here equal to the demands): 34 free rows at 20:10 → 22.7 → 23 + 11;
    /// 9 at 5:3 → 6 + 3; 5 at 2:2 → 3 + 2.
    @Test func madaKVProportionalCompensationSumsToTheTotal() throws {
        var settings = MadaKVSettings()
        settings.proxyWindow = 4
        let budgets = try BudgetAllocator.allocate(
            policy: .madaKV(settings),
            retention: 0.2,
            geometry: geometry(layers: 3, queryHeads: 1, kvHeads: 1),
            statistics: Self.madaStatistics()
        )
        #expect(budgets.map(\.total) == [38, 13, 9])
        #expect(
            budgets.map { $0.heads[0].split } == [
                ModalitySplit(visual: 23, text: 11), ModalitySplit(visual: 6, text: 3),
                ModalitySplit(visual: 3, text: 2),
            ]
        )
    }

    @Test func madaKVModalitySplitRoundsTowardsTheLargerShare() {
        let h = HeadModalityStatistics(
            visualMass: 2,
            textMass: 1,
            visualDemand: 0,
            textDemand: 0,
            jointDemand: 0,
            visualCount: 50,
            textCount: 50
        )
        // 10 × 2/3 = 6.67 → 6 + 3, remainder to visual.
        #expect(BudgetAllocator.modalitySplit(10, 2, 1, h) == ModalitySplit(visual: 7, text: 3))
        // More visual rows than exist spill over to text.
        let few = HeadModalityStatistics(
            visualMass: 9,
            textMass: 1,
            visualDemand: 0,
            textDemand: 0,
            jointDemand: 0,
            visualCount: 4,
            textCount: 50
        )
        #expect(BudgetAllocator.modalitySplit(10, 9, 1, few) == ModalitySplit(visual: 4, text: 6))
    }

    /// m = 8, window 2, no pooling, two heads of capacity 5, α = 0.34 (one guaranteed row each): head
    /// 0's votes sit on position 0, head 1's are spread, so the four contested rows all go to head 1.
    @Test func adaKVGivesTheContestedRowsToTheSpreadHead() {
        var settings = AdaKVSettings()
        settings.snap.window = 2
        settings.snap.kernel = 1
        settings.safeguard = 0.34
        let votes: [[Float]] = [[5, 0.1, 0.1, 0.1, 0.1, 0.1, 1, 1], [1, 0.9, 0.8, 0.7, 0.6, 0.5, 1, 1]]
        let kept = LayerCompressor.adaptive(settings, capacities: [5, 5], m: 8) { votes[$0][...] }
        #expect(kept == [[0, 6, 7], [0, 1, 2, 3, 4, 6, 7]])
    }

    /// Equal votes everywhere and no safeguard: the lower head wins every tie, up to all it has.
    @Test func adaKVBreaksTiesTowardsTheLowerHead() {
        var settings = AdaKVSettings()
        settings.snap.window = 2
        settings.snap.kernel = 1
        settings.safeguard = 0
        let kept = LayerCompressor.adaptive(settings, capacities: [5, 5], m: 8) { _ in
            [Float](repeating: 1, count: 8)[...]
        }
        #expect(kept == [Array(0..<8), [6, 7]])
    }

    /// With α = 1 every head keeps its own even share: exactly SnapKV's choice.
    @Test func adaKVWithAFullSafeguardIsSnapKV() throws {
        let g = geometry(layers: 1, queryHeads: 4, kvHeads: 2)
        let m = 60
        let l = layout(m: m, textBefore: 6, visual: 40)
        let prefill = randomPrefill(g, m: m, seed: 5)
        var ada = AdaKVSettings()
        ada.snap.window = 8
        ada.safeguard = 1
        let profile = try AttentionProfile(
            prefill: prefill,
            requirements: CompressionPolicy.adaKV(ada).requirements(layout: l)
        )
        let budget = LayerBudget(layer: 0, heads: Array(repeating: HeadBudget(capacity: 20), count: 2))
        func positions(_ policy: CompressionPolicy) throws -> [[Int32]] {
            try LayerCompressor.compress(
                prefill,
                layout: l,
                profile: profile,
                budget: budget,
                policy: policy,
                as: Float.self
            ).heads.map(\.positions)
        }
        #expect(try positions(.adaKV(ada)) == positions(.snapKV(ada.snap)))
        ada.safeguard = 0.2
        let adaptive = try positions(.adaKV(ada))
        #expect(adaptive.map(\.count).reduce(0, +) == 40, "the layer keeps SnapKV's total")
    }

    @Test func apportionRespectsBoundsAndTotal() {
        let result = BudgetAllocator.apportion(total: 10, weights: [1, 1, 1], lower: [0, 0, 0], upper: [9, 9, 9])
        #expect(result == [4, 3, 3])
        #expect(BudgetAllocator.apportion(total: 1, weights: [1, 1], lower: [2, 2], upper: [5, 5]) == [2, 2])
    }

    /// Keys 0 = (1, 0), 1 = (0, 1), 2 = (1, 0.1): evicted row 2 joins pivot 0 (cosine 0.995 vs 0.0995).
    @Test(arguments: [LookMSettings.Merge.averaged, .pivotal, .weighted, .values])
    func lookMMergeFormulas(mode: LookMSettings.Merge) throws {
        let g = try ModelGeometry(name: "merge", layers: 1, queryHeads: 1, kvHeads: 1, headDim: 2, tokensPerImage: 1)
        let prefill = try LayerPrefill(
            geometry: g,
            promptLength: 3,
            keys: [1, 0, 0, 1, 1, 0.1],
            values: [2, 0, 0, 2, 4, 4],
            queries: [],
            queryRows: 0
        )
        var rows = MergedRows(prefill: prefill)
        let merged = rows.merge(kept: [[0, 1]], mode: mode, filterBelowMean: true)
        #expect(merged == 1)
        let s = Float(1 / (1.01).squareRoot())
        let (key, value): ([Float], [Float]) =
            switch mode {
            case .averaged: ([1, 0.05], [3, 2])
            case .pivotal: ([1, 0.025], [2.5, 1])
            case .values: ([1, 0], [2.5, 1])  // the key as it was
            default: ([(1 + s) / 2, 0.05 * s], [1 + 2 * s, 2 * s])
            }
        var runs: [(positions: Range<Int>, keys: [Float], values: [Float])] = []
        rows.forEachRun(head: 0, of: [0, 1]) { runs.append(($0, Array($1), Array($2))) }
        // The merged row on its own, then the untouched one read from the prefill.
        #expect(runs.map(\.positions) == [0..<1, 1..<2])
        for c in 0..<2 {
            #expect(abs(runs[0].keys[c] - key[c]) < 1e-6, "\(mode) key")
            #expect(abs(runs[0].values[c] - value[c]) < 1e-6, "\(mode) value")
        }
        #expect(runs[1].keys == [0, 1])
        #expect(runs[1].values == [0, 2])
        // Without merging, consecutive kept rows come as one run.
        runs = []
        MergedRows(prefill: prefill).forEachRun(head: 0, of: [0, 1, 2]) { runs.append(($0, Array($1), Array($2))) }
        #expect(runs.map(\.positions) == [0..<3])
        #expect(runs.first?.keys == prefill.keys[0])
    }

    /// The text prior ranks every text token above every image token inside the heavy budget.
    @Test(arguments: [LookMSettings.TextPrior.addMax, .keepAllText])
    func lookMTextPriorKeepsTextFirst(prior: LookMSettings.TextPrior) throws {
        let g = geometry(layers: 1, queryHeads: 2, kvHeads: 1)
        let m = 40
        let l = layout(m: m, textBefore: 6, visual: 30)
        let prefill = randomPrefill(g, m: m, seed: 9)
        var settings = LookMSettings()
        settings.textPrior = prior
        settings.merge = .none
        let policy = CompressionPolicy.lookM(settings)
        let profile = try AttentionProfile(prefill: prefill, requirements: policy.requirements(layout: l))
        let result = try LayerCompressor.compress(
            prefill,
            layout: l,
            profile: profile,
            budget: LayerBudget(layer: 0, heads: [HeadBudget(capacity: 16)]),
            policy: policy,
            as: Float.self
        )
        let kept = Set(result.heads[0].positions.map(Int.init))
        // 8 recent (32..<40) and 8 heavy: the 6 leading text tokens, then the 2 best image tokens.
        #expect(kept.isSuperset(of: Set(0..<6).union(32..<40)))
        #expect(kept.count == 16)
    }

    /// Positions 0..<6 text, 6..<36 image, 36..<40 the question. TGV-KV keeps sinks 0...3 and the
    /// last row, then text (4, 5, 36, 37, 38), then the images the question weighs most.
    @Test func tgvKeepsSinksAndRecentThenTextThenTextWeightedImages() throws {
        let g = geometry(layers: 1, queryHeads: 2, kvHeads: 1)
        let m = 40
        let l = layout(m: m, textBefore: 6, visual: 30)
        let prefill = randomPrefill(g, m: m, seed: 12)
        let policy = CompressionPolicy.tgv(.init())
        #expect(policy.requirements(layout: l).textWeightedStart == 36)
        let profile = try AttentionProfile(prefill: prefill, requirements: policy.requirements(layout: l))
        func kept(_ capacity: Int) throws -> [Int] {
            try LayerCompressor.compress(
                prefill,
                layout: l,
                profile: profile,
                budget: LayerBudget(layer: 0, heads: [HeadBudget(capacity: capacity)]),
                policy: policy,
                as: Float.self
            ).heads[0].positions.map(Int.init)
        }
        let weighted = profile.kvHeadTextWeightedScores()
        let images = Selection.top(6, of: weighted, among: Array(6..<36))
        #expect(try kept(16) == [0, 1, 2, 3, 4, 5] + images + [36, 37, 38, 39])
        // Room for 3 of the 5 free text positions: ranked by the question's attention, no image.
        let question = profile.kvHeadScores(start: 36)
        let text = Selection.top(3, of: question, among: [4, 5, 36, 37, 38])
        #expect(try kept(8) == [0, 1, 2, 3] + text + [39])

        // Cut further under memory pressure, the head keeps TGV-KV's order: text first, so 10 rows
        // are the 10 text positions, and 12 add the two images of highest text-weighted attention.
        let head = try LayerCompressor.compress(
            prefill,
            layout: l,
            profile: profile,
            budget: LayerBudget(layer: 0, heads: [HeadBudget(capacity: 16)]),
            policy: policy,
            as: Float.self
        ).heads[0]
        let ranking = try #require(policy.positionScores(profile: profile, layout: l))
        let rowScores = head.positions.map { ranking[Int($0)] }
        func tightened(_ capacity: Int) -> [Int] {
            head.tightened(promptLength: m, capacity: capacity, scores: rowScores).cache.positions.map(Int.init)
        }
        #expect(tightened(10) == [0, 1, 2, 3, 4, 5, 36, 37, 38, 39])
        #expect(
            tightened(12) == ([0, 1, 2, 3, 4, 5] + Selection.top(2, of: weighted, among: images) + [36, 37, 38, 39])
        )
    }

    /// The text-weighted sums equal a direct causal softmax in double precision: each question row's
    /// attention, weighted by the mean attention the question's rows pay that row.
    @Test func textWeightedSumsMatchDirectAttention() throws {
        let g = geometry(layers: 1, queryHeads: 1, kvHeads: 1, headDim: 16)
        let m = 30
        let start = 24
        let prefill = randomPrefill(g, m: m, seed: 13)
        let profile = try AttentionProfile(
            prefill: prefill,
            requirements: ProfileRequirements(suffixStarts: [start], textWeightedStart: start)
        )
        var attention = [[Double]](repeating: [Double](repeating: 0, count: m), count: m)
        for q in start..<m {
            for (j, p) in Self.directAttention(prefill, row: q).enumerated() { attention[q][j] = p }
        }
        for j in 0..<m {
            var want = 0.0
            for q in start..<m {
                let weight = (q..<m).reduce(0.0) { $0 + attention[$1][q] } / Double(m - q)
                want += weight * attention[q][j]
            }
            #expect(abs(Double(profile.textWeightedSums[j]) - want) < 1e-5, "position \(j)")
        }
        #expect(throws: KVCacheError.self) {
            try AttentionProfile(prefill: prefill, requirements: ProfileRequirements(textWeightedStart: start))
        }
    }

    /// Layers get rows in proportion to the question's attention on images: masses 1 and 3, 40 rows
    /// → 10 and 30; no attention on images at all → uniform.
    @Test func tgvLayerBudgetsFollowTextToVisualMass() throws {
        func statistics(_ masses: [Double]) -> [LayerStatistics] {
            masses.enumerated().map { l, mass in
                let head = HeadModalityStatistics(
                    visualMass: mass,
                    textMass: 1,
                    visualDemand: 0,
                    textDemand: 0,
                    jointDemand: 0,
                    visualCount: 60,
                    textCount: 40
                )
                return LayerStatistics(layer: l, promptLength: 100, density: 1, heads: [head])
            }
        }
        let g = geometry(layers: 2, queryHeads: 1, kvHeads: 1)
        func capacities(_ masses: [Double]) throws -> [Int] {
            try BudgetAllocator.allocate(
                policy: .tgv(.init()),
                retention: 0.2,
                geometry: g,
                statistics: statistics(masses)
            ).map { $0.heads[0].capacity }
        }
        #expect(try capacities([1, 3]) == [10, 30])
        #expect(try capacities([0, 0]) == [20, 20])
        // Never below the sinks and the last row.
        #expect(try capacities([0.001, 3]) == [5, 35])
    }

    /// 48 rows, an image at 6..<36: the post-vision rows are 36..<48; at most the last 8 of them start
    /// at 40, at most 32 at 36; a prompt ending in an image observes its last row.
    @Test func observationStarts() throws {
        let l = layout(m: 48, textBefore: 6, visual: 30)
        func start(_ observation: VLCacheSettings.Observation, _ layout: PromptLayout) -> Int {
            var settings = VLCacheSettings()
            settings.observation = observation
            return settings.observationStart(layout: layout)
        }
        #expect(start(.postVision, l) == 36)
        #expect(start(.postVisionAtMost(8), l) == 40)
        #expect(start(.postVisionAtMost(32), l) == 36)
        #expect(start(.lastRows(20), l) == 28)
        let endsInImage = try PromptLayout(spans: [
            ModalitySpan(.text, start: 0, count: 6), ModalitySpan(.image(0), start: 6, count: 30),
        ])
        #expect(start(.postVision, endsInImage) == 35)
        #expect(start(.postVisionAtMost(8), endsInImage) == 35)
    }

    /// The composite with only the layer budgets on is VL-Cache with exact apportionment and a floor of
    /// half the average share, row for row, under every observation.
    @Test(arguments: [VLCacheSettings.Observation.postVision, .lastRows(8), .postVisionAtMost(8)])
    func compositeWithOnlyLayerBudgetsIsVLCache(observation: VLCacheSettings.Observation) throws {
        let g = geometry(layers: 3, queryHeads: 4, kvHeads: 2)
        let m = 48
        let l = layout(m: m, textBefore: 6, visual: 30)
        var settings = CompositeSettings()
        settings.layerBudgets = true
        settings.headSplit = false
        settings.merge = .none
        settings.observation = observation
        #expect(CompressionPolicy.composite(settings).label.hasPrefix("composite[layers"))
        for retention in [0.1, 0.3] {
            let composite = try compressAll(
                g,
                m: m,
                layout: l,
                policy: .composite(settings),
                retention: retention,
                seed: 21
            )
            let vlCache = try compressAll(
                g,
                m: m,
                layout: l,
                policy: .vlCache(settings.layerBudgetSettings(retention)),
                retention: retention,
                seed: 21
            )
            #expect(composite.heads.map { $0.map(\.positions) } == vlCache.heads.map { $0.map(\.positions) })
        }
    }

    /// m = 100, one KV head, α = 0.2, densities 1, 1 and 10: the paper's clipped fractions give
    /// 5, 5 and 50 rows; the composite's floor of half the share (10 rows) gives 10, 10 and the
    /// remaining 40.
    @Test func compositeLayerBudgetsKeepAFloorOfHalfTheShare() throws {
        let statistics = [1.0, 1.0, 10.0].enumerated().map { l, density in
            LayerStatistics(layer: l, promptLength: 100, density: density, heads: [])
        }
        let g = geometry(layers: 3, queryHeads: 1, kvHeads: 1)
        var settings = CompositeSettings()
        settings.layerBudgets = true
        settings.headSplit = false
        let composite = try BudgetAllocator.allocate(
            policy: .composite(settings),
            retention: 0.2,
            geometry: g,
            statistics: statistics
        )
        let vlCache = try BudgetAllocator.allocate(
            policy: .vlCache(.init()),
            retention: 0.2,
            geometry: g,
            statistics: statistics
        )
        #expect(composite.map { $0.heads[0].capacity } == [10, 10, 40])
        #expect(vlCache.map { $0.heads[0].capacity } == [5, 5, 50])
    }

    /// Positions 0...2 and 17...19 text, the rest an image; scores rise with the position. Capacity 12
    /// keeps row 19 as recent; the split asks 4 images and 7 texts, but only 5 text candidates are
    /// left (0, 1, 2, 17, 18), so the two rows over go to the best remaining images (11, 12).
    @Test func compositeGivesAModalitysUnusedShareToTheOther() {
        let l = layout(m: 20, textBefore: 3, visual: 14)
        let kept = LayerCompressor.composite(
            capacity: 12,
            split: ModalitySplit(visual: 4, text: 7),
            m: 20,
            tags: l.tags,
            scores: (0..<20).map(Float.init)[...]
        )
        #expect(kept == [0, 1, 2, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    }

    /// m = 100, two heads, α = 0.2. VL-Cache's part: densities 1 and 3 → 10 and 30 rows per head.
    /// MadaKV's part: layer 0's 20 rows go 6 : 14 by the heads' demands; head 0 keeps no recent row
    /// (10% of 6) and splits its 6 by modality masses 3 : 1 → 4.5 → 5 visual, 1 text.
    @Test func compositeSplitsVLCacheLayerBudgetsByMadaKVDemands() throws {
        func head(demand: Int, visualMass: Double) -> HeadModalityStatistics {
            HeadModalityStatistics(
                visualMass: visualMass,
                textMass: 1,
                visualDemand: demand,
                textDemand: 0,
                jointDemand: demand,
                visualCount: 60,
                textCount: 40
            )
        }
        let statistics = [1.0, 3.0].enumerated().map { l, density in
            LayerStatistics(
                layer: l,
                promptLength: 100,
                density: density,
                heads: [head(demand: 3, visualMass: 3), head(demand: 7, visualMass: 1)]
            )
        }
        var settings = CompositeSettings()
        settings.layerBudgets = true
        let budgets = try BudgetAllocator.allocate(
            policy: .composite(settings),
            retention: 0.2,
            geometry: geometry(layers: 2, queryHeads: 2, kvHeads: 2),
            statistics: statistics
        )
        #expect(budgets[0].heads.map(\.capacity) == [6, 14])
        #expect(budgets[1].heads.map(\.capacity) == [18, 42])
        #expect(budgets[0].heads[0].split == ModalitySplit(visual: 5, text: 1))
        // Head 1 of layer 0: 14 rows, 1 recent, 13 split 1 : 1 → 6.5 → 7 visual (ties go to images), 6 text.
        #expect(budgets[0].heads[1].split == ModalitySplit(visual: 7, text: 6))
    }

    @Test func gqaScoresAreTheGroupMean() throws {
        let g = geometry(layers: 1, queryHeads: 4, kvHeads: 2)
        let m = 24
        let profile = try AttentionProfile(
            prefill: randomPrefill(g, m: m, seed: 5),
            requirements: ProfileRequirements(suffixStarts: [0, 20])
        )
        for start in [0, 20] {
            let sums = profile.columnSums[start]!
            let kv = profile.kvHeadScores(start: start)
            for h in 0..<2 {
                for j in 0..<m {
                    let mean = (sums[(2 * h) * m + j] + sums[(2 * h + 1) * m + j]) / 2
                    #expect(abs(kv[h * m + j] - mean) < 1e-6)
                }
            }
        }
    }

    /// Row `q`'s causal softmax over keys `0...q` in double precision, for a prefill of one query
    /// head and one KV head.
    static func directAttention(_ prefill: LayerPrefill, row q: Int) -> [Double] {
        let d = prefill.geometry.headDim
        let logits: [Double] = (0...q).map { j in
            var sum = 0.0
            for c in 0..<d { sum += Double(prefill.queries[q * d + c]) * Double(prefill.keys[0][j * d + c]) }
            return sum / Double(d).squareRoot()
        }
        let top = logits.max()!
        let e = logits.map { exp($0 - top) }
        let z = e.reduce(0, +)
        return e.map { $0 / z }
    }

    /// Column sums from the backward pass equal a direct causal softmax in double precision.
    @Test func columnSumsMatchDirectAttention() throws {
        let g = geometry(layers: 1, queryHeads: 1, kvHeads: 1, headDim: 16)
        let m = 30
        let prefill = randomPrefill(g, m: m, seed: 11)
        let profile = try AttentionProfile(prefill: prefill, requirements: ProfileRequirements(suffixStarts: [0, 25]))
        for start in [0, 25] {
            var want = [Double](repeating: 0, count: m)
            for q in start..<m {
                for (j, p) in Self.directAttention(prefill, row: q).enumerated() { want[j] += p }
            }
            for j in 0..<m { #expect(abs(Double(profile.columnSums[start]![j]) - want[j]) < 1e-4) }
        }
    }

    @Test func errorsNameWhatIsAllowed() throws {
        #expect(throws: KVCacheError.self) { try CompressionPolicy.named("lru") }
        do {
            _ = try CompressionPolicy.named("lru")
        } catch {
            #expect(error.code == .unknownName)
            #expect(error.message.contains("vl-cache"))
        }
        do {
            _ = try ModelGeometry.preset(named: "gpt")
        } catch {
            #expect(error.message.contains("llava-1.5-7b"))
        }
        let g = geometry()
        #expect(throws: KVCacheError(.invalidBudget, "budget must be in (0, 1], got 0.0")) {
            try BudgetAllocator.allocate(policy: .full, retention: 0, geometry: g, statistics: [])
        }
        #expect(throws: KVCacheError.self) {
            try ModelGeometry(name: "bad", layers: 2, queryHeads: 6, kvHeads: 4, headDim: 8, tokensPerImage: 1)
        }
        var keys = [Float](repeating: 0, count: 2 * 4 * 16)
        keys[5] = .nan
        do {
            _ = try LayerPrefill(geometry: g, promptLength: 4, keys: keys, values: keys, queries: [], queryRows: 0)
            Issue.record("a NaN was accepted")
        } catch {
            #expect(error.code == .invalidValue)
            #expect(error.message.contains("keys[5]"))
        }
        do {
            _ = try LayerPrefill(geometry: g, promptLength: 4, keys: [1], values: [1], queries: [], queryRows: 0)
            Issue.record("a wrong shape was accepted")
        } catch {
            #expect(error.code == .invalidShape)
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif

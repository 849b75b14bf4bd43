/// Scores, selects and (for LOOK-M) merges one layer's prefill down to its budget. Deterministic:
/// the same inputs, policy and budget give the same bytes, so replicas hold identical caches.
public enum LayerCompressor {
    /// The compressed layer: one cache per KV head, and how many evicted rows were merged.
    public struct Result<S: KVScalar>: Sendable {
        public var heads: [HeadCache<S>]
        public var mergedRows: Int
    }

    /// The layer compressed to `budget`, each head with room for `decodeRows` decoded rows. With
    /// `adoptWholeHeads`, a Float32 head that keeps every prompt row unchanged takes the prefill's
    /// arrays rather than a copy (see `LayerPrefill`); without it, every head is copied.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func compress<S: KVScalar>(
        _ prefill: LayerPrefill,
        layout: PromptLayout,
        profile: AttentionProfile?,
        budget: LayerBudget,
        policy: CompressionPolicy,
        decodeRows: Int = 0,
        adoptWholeHeads: Bool = true,
        as _: S.Type = S.self
    ) throws(KVCacheError) -> Result<S> {
        let g = prefill.geometry
        let m = prefill.promptLength
        guard layout.promptLength == m else {
            throw KVCacheError(.invalidShape, "layout has \(layout.promptLength) positions, prefill has \(m)")
        }
        guard budget.heads.count == g.kvHeads else {
            throw KVCacheError(.invalidShape, "budget has \(budget.heads.count) heads, the model \(g.kvHeads)")
        }
        if let bad = budget.heads.first(where: { $0.capacity < 1 }) {
            throw KVCacheError(.invalidBudget, "a head's capacity must be ≥ 1, got \(bad.capacity)")
        }
        let requirements = policy.requirements(layout: layout)
        let needed = requirements.suffixStarts
        if !needed.isEmpty {
            guard let profile, needed.isSubset(of: Set(profile.columnSums.keys)), profile.promptLength == m,
                requirements.textWeightedStart == nil || !profile.textWeightedSums.isEmpty
            else {
                throw KVCacheError(
                    .invalidShape,
                    "\(policy.name) needs attention sums over rows from \(needed.sorted())"
                )
            }
        }
        let scoreCache = ScoreCache(profile: profile)
        let kept: [[Int]]
        if case .adaKV(let s) = policy {
            kept = adaptive(s, capacities: budget.heads.map(\.capacity), m: m) { h in
                scoreCache.scores(start: max(0, m - s.snap.window), head: h)
            }
        } else {
            kept = (0..<g.kvHeads).map { h in
                select(
                    policy: policy,
                    head: h,
                    capacity: min(m, budget.heads[h].capacity),
                    split: budget.heads[h].split,
                    m: m,
                    layout: layout,
                    scores: scoreCache
                )
            }
        }
        var rows = MergedRows(prefill: prefill)
        var merged = 0
        if let (mode, filterBelowMean) = policy.merging {
            merged = rows.merge(kept: kept, mode: mode, filterBelowMean: filterBelowMean)
        }
        var heads: [HeadCache<S>] = []
        for h in 0..<g.kvHeads {
            if adoptWholeHeads, S.self == Float.self, kept[h].count == m, rows.isUnchanged(head: h) {
                // Kept whole as it came: the head adopts the prefill's arrays instead of copying them.
                heads.append(
                    HeadCache(
                        wholePrompt: unsafeBitCast(prefill.keys[h], to: [S].self),
                        values: unsafeBitCast(prefill.values[h], to: [S].self),
                        tags: layout.tags,
                        headDim: g.headDim,
                        decodeRows: decodeRows
                    )
                )
                continue
            }
            // Room for the decoded rows to come: growing later would copy the whole head.
            var cache = HeadCache<S>(headDim: g.headDim, capacity: kept[h].count + max(0, decodeRows))
            rows.forEachRun(head: h, of: kept[h]) { positions, keys, values in
                cache.append(keys: keys, values: values, positions: positions, tags: layout.tags[positions])
            }
            heads.append(cache)
        }
        return Result(heads: heads, mergedRows: merged)
    }

    /// Per KV head score vectors, computed once per observed suffix.
    final class ScoreCache {
        let profile: AttentionProfile?
        private var byStart: [Int: [Float]] = [:]

        init(profile: AttentionProfile?) { self.profile = profile }

        func scores(start: Int, head: Int) -> ArraySlice<Float> {
            let m = profile!.promptLength
            if byStart[start] == nil { byStart[start] = profile!.kvHeadScores(start: start) }
            return byStart[start]![(head * m)..<(head * m + m)]
        }

        private var textWeighted: [Float]?

        /// TGV-KV's text-weighted scores of one KV head.
        func textWeightedScores(head: Int) -> ArraySlice<Float> {
            let m = profile!.promptLength
            if textWeighted == nil { textWeighted = profile!.kvHeadTextWeightedScores() }
            return textWeighted![(head * m)..<(head * m + m)]
        }
    }

    /// Kept prompt positions of one head, ascending.
    static func select(
        policy: CompressionPolicy,
        head h: Int,
        capacity k: Int,
        split: ModalitySplit?,
        m: Int,
        layout: PromptLayout,
        scores cache: ScoreCache
    ) -> [Int] {
        if k >= m { return Array(0..<m) }
        /// The last `count` positions plus the top `k − count` of `scores` before them.
        func recentPlusTop(_ recent: Int, _ scores: [Float]) -> [Int] {
            Selection.top(k - recent, of: scores, among: Array(0..<(m - recent))) + Array((m - recent)..<m)
        }
        switch policy {
        case .full:
            return Array(0..<m)
        case .streamingLLM(let s):
            let sinks = min(s.sinks, k)
            return Array(0..<sinks) + Array((m - (k - sinks))..<m)
        case .h2o(let s):
            var scores = Array(cache.scores(start: 0, head: h))
            if s.normalizeByQueryCount {
                for j in 0..<m { scores[j] /= Float(m - j) }
            }
            return recentPlusTop(recentRows(capacity: k, share: s.recentShare), scores)
        case .snapKV(let s):
            return snap(s, head: h, window: min(s.window, k), k: k, m: m, cache: cache)
        case .composite(let s):
            let start = s.vlCache.observationStart(layout: layout)
            return composite(
                capacity: k,
                split: split,
                m: m,
                tags: layout.tags,
                scores: cache.scores(start: start, head: h)
            )
        case .tgv(let s):
            return textGrounded(
                s,
                capacity: k,
                m: m,
                tags: layout.tags,
                textScores: cache.scores(start: TGVSettings.textStart(layout: layout), head: h),
                visualScores: cache.textWeightedScores(head: h)
            )
        case .adaKV(let s):
            // AdaKV selects a whole layer at once (`adaptive`); one head on its own is SnapKV's.
            return snap(s.snap, head: h, window: min(s.snap.window, k), k: k, m: m, cache: cache)
        case .pyramidKV(let s):
            return snap(s.snap, head: h, window: min(s.snap.window, k), k: k, m: m, cache: cache)
        case .vlCache(let s):
            let scores = Array(cache.scores(start: s.observationStart(layout: layout), head: h))
            return recentPlusTop(recentRows(capacity: k, share: s.recentShare), scores)
        case .madaKV(let s):
            let w = min(s.proxyWindow, m, k)
            let scores = Array(cache.scores(start: m - min(s.proxyWindow, m), head: h))
            let candidates = Array(0..<(m - w))
            let chosen: [Int]
            if let split {
                let visual = candidates.filter { layout.tags[$0].isVisual }
                let text = candidates.filter { !layout.tags[$0].isVisual }
                chosen =
                    Selection.top(split.visual, of: scores, among: visual)
                    + Selection.top(split.text, of: scores, among: text)
            } else {
                chosen = Selection.top(k - w, of: scores, among: candidates)
            }
            return chosen.sorted() + Array((m - w)..<m)
        case .lookM(let s):
            let recent = recentRows(capacity: k, share: s.recentShare)
            let heavy = k - recent
            var scores = Array(cache.scores(start: 0, head: h))
            let prefix = Array(0..<(m - recent))
            switch s.textPrior {
            case .addMax:
                let prior = prefix.lazy.map { scores[$0] }.max() ?? 0
                for j in prefix where !layout.tags[j].isVisual { scores[j] += prior }
                return recentPlusTop(recent, scores)
            case .keepAllText:
                let text = prefix.filter { !layout.tags[$0].isVisual }
                let visual = prefix.filter { layout.tags[$0].isVisual }
                let images = Selection.top(max(0, heavy - text.count), of: scores, among: visual)
                return (text + images).sorted() + Array((m - recent)..<m)
            case .none:
                let sinks = min(s.sinks, heavy, m - recent)
                let rest = Selection.top(heavy - sinks, of: scores, among: Array(sinks..<(m - recent)))
                return Array(0..<sinks) + rest + Array((m - recent)..<m)
            }
        }
    }

    /// The rows a recent share of `capacity` protects.
    static func recentRows(capacity: Int, share: Double) -> Int { Int(share * Double(capacity)) }

    /// SnapKV: pooled votes of the window rows, top `k − window` before the window, plus the window.
    static func snap(_ s: SnapKVSettings, head: Int, window: Int, k: Int, m: Int, cache: ScoreCache) -> [Int] {
        let pooled = pooledVotes(s, cache.scores(start: max(0, m - s.window), head: head), before: m - window)
        return Selection.top(k - window, of: pooled, among: Array(0..<(m - window))) + Array((m - window)..<m)
    }

    /// SnapKV's pooled votes of positions `0 ..< count` (those before the kept window).
    static func pooledVotes(_ s: SnapKVSettings, _ votes: ArraySlice<Float>, before count: Int) -> [Float] {
        Selection.pool(votes[votes.startIndex..<(votes.startIndex + count)], kernel: s.kernel, mode: s.pooling)
    }
}

/// AdaKV over SnapKV's scores ("Ada-SnapKV"): Feng et al., "Ada-KV: Optimizing KV Cache Eviction by
/// Adaptive Budget Allocation for Efficient LLM Inference", NeurIPS 2025 (arXiv 2407.11550); official
/// code FFY0/AdaKV, and NVIDIA kvpress's `AdaKVPress` (reviewed by the paper's first author).
///
/// A layer's budget is not split evenly over its KV heads: beyond each head's observation window,
/// the layer keeps the rows with the highest pooled window votes across all of its heads, so a head
/// whose attention is concentrated on a few rows gives budget to one whose attention is spread out.
/// As the paper's safeguard, every head first keeps its own best `safeguard` (α) share of what an
/// even split would give it beyond the window; α = 0.2 in the paper and in kvpress.
///
/// Choices the paper leaves open (tested in `PolicyTests`):
/// - Votes are compared across heads as they are: each query row's softmax sums to 1, so every head
///   casts the same total. Equal votes go to the lower head, then the lower position.
/// - The window and the layer's total are SnapKV's, so the layer keeps exactly as many rows as SnapKV
///   would: only their split over heads differs. The coordinator's budgets stay per layer (uniform,
///   as for SnapKV); a worker that must tighten a sequence later cuts every head to that even share.
public struct AdaKVSettings: Sendable, Hashable, Codable {
    /// SnapKV's window, pooling kernel and mode, used for the votes.
    public var snap = SnapKVSettings()
    /// α: the share of its even split (beyond the window) a head keeps by its own votes, in [0, 1].
    public var safeguard = 0.2
    public init() {}

    func validate(_ require: (Bool, String) throws(KVCacheError) -> Void) throws(KVCacheError) {
        try snap.validate(require)
        try require((0...1).contains(safeguard), "safeguard must be in [0, 1], got \(safeguard)")
    }
}

extension LayerCompressor {
    /// Ada-SnapKV's kept positions of every head of a layer (ascending per head): each head's window,
    /// its safeguard share, and the rest of the layer's budget by votes across heads. `capacities`
    /// are the heads' even budgets, window included; `windowVotes(h)` is head `h`'s attention from
    /// the last `window` rows to each of the `m` positions.
    static func adaptive(
        _ s: AdaKVSettings,
        capacities: [Int],
        m: Int,
        windowVotes: (Int) -> ArraySlice<Float>
    ) -> [[Int]] {
        let heads = capacities.count
        // Every head's pooled votes, head after head (m slots each; window slots are never candidates).
        var votes = [Float](repeating: 0, count: heads * m)
        var windows: [Int] = []
        var kept: [[Int]] = []
        var contested: [Int] = []
        var contestedBudget = 0
        for h in 0..<heads {
            let k = min(m, capacities[h])
            let w = min(s.snap.window, k)
            windows.append(w)
            let pooled = pooledVotes(s.snap, windowVotes(h), before: m - w)
            votes.replaceSubrange((h * m)..<(h * m + m - w), with: pooled)
            let guaranteed = Int(s.safeguard * Double(k - w))
            let own = Selection.top(guaranteed, of: pooled, among: Array(0..<(m - w)))
            kept.append(own)
            var isOwn = [Bool](repeating: false, count: m - w)
            for j in own { isOwn[j] = true }
            contested += (0..<(m - w)).lazy.filter { !isOwn[$0] }.map { h * m + $0 }
            contestedBudget += k - w - guaranteed
        }
        for slot in Selection.top(contestedBudget, of: votes, among: contested) {
            kept[slot / m].append(slot % m)
        }
        return (0..<heads).map { h in kept[h].sorted() + Array((m - windows[h])..<m) }
    }
}

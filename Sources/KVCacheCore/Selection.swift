/// Choosing positions by score: top-k with ties to the lower position, and SnapKV's 1-D pooling.
public enum Selection {
    /// The `k` best positions of `candidates` by `scores` (higher first; equal scores prefer the lower
    /// position), in ascending position order. Quickselect: linear on average, no sort of the rest.
    public static func top(_ k: Int, of scores: UnsafeBufferPointer<Float>, among candidates: [Int]) -> [Int] {
        if k <= 0 { return [] }
        if k >= candidates.count { return candidates.sorted() }
        var items = candidates
        // `a` ranks before `b`: a higher score, or the same score at a lower position.
        @inline(__always) func before(_ a: Int, _ b: Int) -> Bool {
            let sa = scores[a]
            let sb = scores[b]
            return sa != sb ? sa > sb : a < b
        }
        var lo = 0
        var hi = items.count - 1
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        while lo < hi {
            // A deterministic pseudo-random pivot keeps sorted inputs linear.
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            let pivot = items[lo + Int((state >> 33) % UInt64(hi - lo + 1))]
            var i = lo
            var j = hi
            while i <= j {
                while before(items[i], pivot) { i += 1 }
                while before(pivot, items[j]) { j -= 1 }
                if i <= j {
                    items.swapAt(i, j)
                    i += 1
                    j -= 1
                }
            }
            if k - 1 <= j { hi = j } else if k - 1 >= i { lo = i } else { break }
        }
        return items[0..<k].sorted()
    }

    public static func top(_ k: Int, of scores: [Float], among candidates: [Int]) -> [Int] {
        scores.withUnsafeBufferPointer { top(k, of: $0, among: candidates) }
    }

    /// Stride-1 pooling with zero padding `kernel/2`; the average counts the padded zeros, as
    /// PyTorch's `avg_pool1d` does by default (edges score lower), and max pools ignore padding.
    public static func pool(_ scores: ArraySlice<Float>, kernel: Int, mode: Pooling) -> [Float] {
        let n = scores.count
        let base = scores.startIndex
        let half = kernel / 2
        guard mode != .none, kernel > 1 else { return Array(scores) }
        var out = [Float](repeating: 0, count: n)
        for i in 0..<n {
            let lo = max(0, i - half)
            let hi = min(n - 1, i + half)
            switch mode {
            case .average:
                var sum: Float = 0
                for j in lo...hi { sum += scores[base + j] }
                out[i] = sum / Float(kernel)
            case .max:
                var best = -Float.infinity
                for j in lo...hi { best = max(best, scores[base + j]) }
                out[i] = best
            case .none:
                out[i] = scores[base + i]
            }
        }
        return out
    }
}

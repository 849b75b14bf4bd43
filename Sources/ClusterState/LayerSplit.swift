/// How a sequence's layers are cut into shards.
public enum LayerSplit {
    /// `shardCount` contiguous ranges covering `0..<layerCount`, sizes differing by at most one, the
    /// larger ranges first.
    public static func ranges(layerCount: Int, shardCount: Int) -> [Range<Int>] {
        precondition(
            layerCount >= 1 && (1...layerCount).contains(shardCount),
            "the split needs 1 <= shardCount <= layerCount"
        )
        let base = layerCount / shardCount
        let larger = layerCount % shardCount
        var ranges: [Range<Int>] = []
        ranges.reserveCapacity(shardCount)
        var start = 0
        for index in 0..<shardCount {
            let size = base + (index < larger ? 1 : 0)
            ranges.append(start..<(start + size))
            start += size
        }
        return ranges
    }
}

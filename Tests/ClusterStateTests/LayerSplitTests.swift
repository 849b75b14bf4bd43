import ClusterState
import Testing

@Suite struct LayerSplitTests {
    @Test func splitsAreContiguousAndEven() {
        for layers in 1...80 {
            for count in 1...layers {
                let ranges = LayerSplit.ranges(layerCount: layers, shardCount: count)
                #expect(ranges.count == count)
                #expect(ranges.first?.lowerBound == 0 && ranges.last?.upperBound == layers)
                #expect(zip(ranges, ranges.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound })
                let sizes = ranges.map(\.count)
                #expect(sizes.min()! >= 1 && sizes.max()! - sizes.min()! <= 1, "\(layers) layers, \(count) shards")
                #expect(sizes == sizes.sorted(by: >), "larger ranges first")
            }
        }
    }
}

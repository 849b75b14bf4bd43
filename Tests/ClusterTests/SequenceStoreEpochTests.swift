import ClusterWire
import KVCacheCore
import Testing

@testable import Worker

/// How a worker's copy follows its sequence's epoch: the coordinator takes layer statistics only at
/// the current epoch, so a copy that moves to a new one before it is compressed must report again.
struct SequenceStoreEpochTests {
    /// Sequence 7's shard as `ShardTransferTests.shard` builds it (epoch 3), before compression, with
    /// the statistics its prefill produced at that epoch.
    static func prefilled() throws -> HeldSequence {
        var held = try ShardTransferTests.shard(storage: .float32)
        held.cache = nil
        held.statistics = (0..<2).map { layer in
            var statistics = Tessera_V1_LayerStats()
            statistics.sequenceID = 7
            statistics.layer = UInt32(layer)
            statistics.epoch = 3
            return statistics
        }
        return held
    }

    static func moved(_ held: HeldSequence, to epoch: UInt64) -> HeldSequence {
        var moved = held
        moved.epoch = epoch
        moved.assignment.epoch = epoch
        return moved
    }

    @Test func aCopyMovedToANewEpochBeforeCompressionReportsItsStatisticsAgain() async throws {
        let held = try Self.prefilled()
        let store = SequenceStore()
        #expect(try await store.assign(7, held).isEmpty, "a new copy has nothing to report yet")
        #expect(try await store.assign(7, held).isEmpty, "the same epoch again changes nothing")

        let again = try await store.assign(7, Self.moved(held, to: 4))
        #expect(again.map(\.layer) == [0, 1])
        #expect(again.allSatisfy { $0.epoch == 4 }, "stamped with the new epoch")
        // After a coordinator restart the copy reports them at the epoch it is at.
        #expect(await store.layerStatistics().map(\.epoch) == [4, 4])

        // An older assignment arriving late changes nothing.
        #expect(try await store.assign(7, Self.moved(held, to: 2)).isEmpty)
        #expect(await store.layerStatistics().map(\.epoch) == [4, 4])
    }

    @Test func aCompressedCopyHasNothingToReport() async throws {
        let held = try ShardTransferTests.shard(storage: .float32)
        let store = SequenceStore()
        _ = try await store.assign(7, held)
        #expect(try await store.assign(7, Self.moved(held, to: 4)).isEmpty)
    }
}

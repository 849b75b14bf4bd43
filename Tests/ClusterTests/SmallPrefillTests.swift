import ClusterWire
import FoundationEssentials
import KVCacheCore
import Testing

@testable import Worker

/// Which prefills a worker takes where they arrive rather than on its prefill threads
/// (`WorkerHandler.isSmall`): inline tensors of at most 256 KiB whose profile is at most 2^20
/// multiply-adds. The tiny model has 4 query heads of 32 dimensions and 2 KV heads.
struct SmallPrefillTests {
    /// A sequence of `m` positions (2 text, the rest an image) on one shard of the tiny model.
    static func held(m: Int, policy: CompressionPolicy) throws -> HeldSequence {
        let layout = try PromptLayout(spans: [
            ModalitySpan(.text, start: 0, count: 2), ModalitySpan(.image(0), start: 2, count: m - 2),
        ])
        var assignment = Tessera_V1_ShardAssignment()
        assignment.tenant = "t"
        assignment.sequenceID = 1
        assignment.shard.layerCount = UInt32(ModelGeometry.tiny.layers)
        assignment.shard.primary.nodeID = "worker-1"
        assignment.model = try ModelGeometry.tiny.proto()
        assignment.spans = try layout.proto()
        assignment.policy = try policy.proto(retention: 0.5)
        return try HeldSequence(assignment: assignment, localNodeID: "worker-1")
    }

    /// One layer's keys and values of `m` positions in float32 (2 × 2 heads × m × 32 × 4 bytes).
    static func inline(m: Int) -> Tessera_V1_Prefill {
        var layer = Tessera_V1_LayerTensors()
        layer.keys.data = Data(count: 2 * m * 32 * 4)
        layer.values.data = Data(count: 2 * m * 32 * 4)
        var message = Tessera_V1_Prefill()
        message.inlineTensors.layers = [layer]
        return message
    }

    @Test func smallInlineTensorsAreTakenWhereTheyArrive() throws {
        // 512 positions: 256 KiB, and the full cache profiles nothing.
        #expect(WorkerHandler.isSmall(Self.inline(m: 512), try Self.held(m: 512, policy: .full)))
        // 1024 positions: 512 KiB.
        #expect(!WorkerHandler.isSmall(Self.inline(m: 1024), try Self.held(m: 1024, policy: .full)))
        // SnapKV observes 32 rows: 32 · 128 · 32 · 4 = 2^19 multiply-adds at 128 positions, 2^21 at 512.
        #expect(WorkerHandler.isSmall(Self.inline(m: 128), try Self.held(m: 128, policy: .snapKV(.init()))))
        #expect(!WorkerHandler.isSmall(Self.inline(m: 512), try Self.held(m: 512, policy: .snapKV(.init()))))
        // H2O observes every row: 128 · 128 · 32 · 4 = 2^21.
        #expect(!WorkerHandler.isSmall(Self.inline(m: 128), try Self.held(m: 128, policy: .h2o(.init()))))
    }

    @Test func aSyntheticPrefillGoesToThePrefillThreads() throws {
        var message = Tessera_V1_Prefill()
        message.synthetic.workload = "image-qa"
        #expect(!WorkerHandler.isSmall(message, try Self.held(m: 64, policy: .full)))
    }
}

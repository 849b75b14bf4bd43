import Client
import ClusterLauncher
import ClusterTransport
import KVCacheCore
import Logging
import Testing
import Workloads

#if canImport(Glibc)
import Glibc
#endif

/// Killing workers under traffic, with real processes and real signals.
@Suite(.serialized) struct FailoverTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    /// Replication 2 on 3 workers: SIGKILL the primary of a shard while sequences are mid-decode. The
    /// coordinator declares it dead, promotes the replicas at a new epoch, and the client retries
    /// through the failover: no sequence is lost and every decode output is bit-identical to one
    /// process computing the same sequences without faults.
    @Test(.timeLimit(.minutes(5)))
    func killingAPrimaryLosesNothing() async throws {
        let seed: UInt64 = 20_261_123
        var options = LocalCluster.Options(
            binary: LocalCluster.siblingBinary, workers: 3, childArguments: ["--log-level", "error"])
        options.toleratesWorkerExits = true
        let launch = options
        try await LocalCluster.withCluster(launch, logger: Self.logger) { cluster in
            try await TesseraClient.withClient(coordinator: cluster.coordinator, tenant: "chaos", logger: Self.logger) {
                client in
                _ = try await eventually("three workers alive") {
                    let status = try await client.status()
                    return status.workers.filter { $0.state == "alive" }.count == 3 ? status : nil
                }
                let generator = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: seed)
                let policy = try CompressionPolicy.named("madakv")
                let count = 6
                var placements: [SequencePlacement] = []
                var expected: [[[Int: [Float]]]] = []
                for index in 0..<count {
                    let trace = generator.sequence(index)
                    placements.append(try await client.openSequence(
                        UInt64(index), geometry: .tiny, layout: trace.layout, policy: policy, retention: 0.2))
                    _ = try await client.prefillSynthetic(UInt64(index), workload: "image-qa", seed: seed, index: index)
                    expected.append(try referenceOutputs(trace, policy: policy, retention: 0.2))
                }
                func decode(_ steps: Range<Int>) async throws {
                    for index in 0..<count {
                        for step in steps {
                            let outputs = try await client.decode(UInt64(index), step: step, geometry: .tiny)
                            for (layer, values) in outputs where values != expected[index][step][layer] {
                                Issue.record("seed \(seed): sequence \(index) step \(step) layer \(layer) differs")
                            }
                        }
                    }
                }
                try await decode(0..<8)
                let victim = try #require(cluster.workers.first { $0.address == placements[0].shards[0].primary })
                #expect(kill(victim.pid, SIGKILL) == 0)
                try await decode(8..<32)
                let status = try await client.status()
                #expect(status.workers.first { $0.id == victim.nodeID }?.state == "dead", "seed \(seed)")
                #expect(status.sequences == count, "seed \(seed): no sequence lost")
                let moved = try await client.refreshPlacement(0)
                #expect(moved.epoch > placements[0].epoch, "seed \(seed): the failover moved to a new epoch")
                #expect(moved.shards[0].primary != victim.address, "seed \(seed)")
                for index in 0..<count { _ = try await client.close(UInt64(index)) }
            }
        }
    }
}

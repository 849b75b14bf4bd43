import Client
import ClusterLauncher
import ClusterTransport
import ClusterWire
import Evaluation
import KVCacheCore
import Logging
import SystemPackage
import Testing
import Workloads

#if canImport(Glibc)
import Glibc
#endif

/// What one process computes for the sequence (see `ReferenceDecode`).
func referenceOutputs(
    _ trace: SequenceTrace,
    policy: CompressionPolicy,
    retention: Double
) throws -> [[Int: [Float]]] {
    try ReferenceDecode.outputs(trace, policy: policy, retention: retention)
}

@Suite(.serialized) struct MultiProcessClusterTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    /// `tessera cluster` processes: 20 mixed sequences through the client, prefill and 32 decode steps
    /// each, outputs bit-identical to KVCacheCore in this process; every shard's replica holds the same
    /// bytes as its primary; after closing, accounting is zero.
    @Test(.timeLimit(.minutes(10)))
    func decodeOutputsMatchOneProcessBitForBit() async throws {
        let seed: UInt64 = 20_261_122
        try await Self.withThreeWorkers { cluster, client, status in
            #expect(status.workers.allSatisfy { $0.primaryShards == 0 && $0.replicaShards == 0 }, "no sequence yet")
            let generator = TraceGenerator(preset: .mixed, geometry: .tiny, seed: seed)
            let policies = CompressionPolicy.allNames
            for index in 0..<20 {
                let trace = generator.sequence(index)
                let policy = try CompressionPolicy.named(policies[index % policies.count])
                let retention = [0.1, 0.2, 0.3][index % 3]
                let id = UInt64(1000 + index)
                let placement = try await client.openSequence(
                    id,
                    geometry: .tiny,
                    layout: trace.layout,
                    policy: policy,
                    retention: retention
                )
                // Three workers, two copies of each shard: one shard per sequence, on two workers.
                #expect(placement.shards.count == 1)
                _ = try await client.prefillSynthetic(
                    id,
                    workload: "mixed",
                    seed: seed,
                    index: index
                )
                let expected = try referenceOutputs(trace, policy: policy, retention: retention)
                for step in 0..<trace.decodeSteps {
                    let outputs = try await client.decode(id, step: step, geometry: .tiny)
                    #expect(outputs.count == trace.geometry.layers)
                    for layer in 0..<trace.geometry.layers where outputs[layer] != expected[step][layer] {
                        Issue.record(
                            "seed \(seed) sequence \(index) (\(policy.name)) step \(step) layer \(layer) differs"
                        )
                    }
                }
            }
            // Every shard has a primary and a replica with the same bytes.
            var copies: [UInt64: [ShardCopy]] = [:]
            for worker in cluster.workers {
                for copy in try await client.shardCopies(on: worker.address) {
                    copies[copy.sequenceID, default: []].append(copy)
                }
            }
            #expect(copies.count == 20, "seed \(seed)")
            for (id, held) in copies {
                #expect(
                    held.count == 2 && held.filter(\.isPrimary).count == 1,
                    "seed \(seed) sequence \(id): \(held)"
                )
                #expect(
                    Set(held.map(\.digest)).count == 1 && held[0].digest != 0,
                    "seed \(seed) sequence \(id): \(held)"
                )
            }
            let open = try await client.status()
            #expect(open.sequences == 20)
            #expect(open.totalKVBytes > 0)
            for index in 0..<20 { _ = try await client.close(UInt64(1000 + index)) }
            let closed = try await eventually("accounted bytes back to zero") {
                let status = try await client.status()
                return status.totalKVBytes == 0 && status.sequences == 0 ? status : nil
            }
            #expect(closed.workers.allSatisfy { $0.kvBytes == 0 })
        }
    }

    /// Three workers and a client, once all three are alive members (their status is passed on).
    static func withThreeWorkers(
        toleratingExits: Bool = false,
        _ body: @escaping @Sendable (LocalCluster, TesseraClient, ClusterStatus) async throws -> Void
    ) async throws {
        var options = LocalCluster.Options(
            binary: LocalCluster.siblingBinary,
            workers: 3,
            childArguments: ["--log-level", "error"],
            inheritStandardError: true
        )
        options.toleratesWorkerExits = toleratingExits
        try await LocalCluster.withCluster(options, logger: Self.logger) { cluster in
            try await TesseraClient.withClient(
                coordinator: cluster.coordinator,
                security: try cluster.clientSecurity(name: "test", tenant: "test"),
                logger: Self.logger
            ) { client in
                let status = try await eventually("three workers alive") {
                    let status = try await client.status()
                    return status.workers.filter { $0.state == "alive" }.count == 3 ? status : nil
                }
                try await body(cluster, client, status)
            }
        }
    }

    /// SIGTERM to a primary: the worker leaves the cluster before it exits, so by the time its process
    /// is gone the coordinator has moved its shard to the replica already. (A worker that only
    /// vanished stays in the placement for the failure detector's dead-after time, 3 s.)
    @Test(.timeLimit(.minutes(3)))
    func aTerminatedWorkerHandsItsShardsOverBeforeItExits() async throws {
        try await Self.withThreeWorkers(toleratingExits: true) { cluster, client, _ in
            let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: 5).sequence(0)
            let placement = try await client.openSequence(
                7,
                geometry: .tiny,
                layout: trace.layout,
                policy: try CompressionPolicy.named("vl-cache"),
                retention: 0.2
            )
            _ = try await client.prefillSynthetic(7, workload: "image-qa", seed: 5, index: 0)
            let primary = placement.shards[0].primary
            let victim = try #require(cluster.workers.first { $0.address == primary })
            kill(victim.pid, SIGTERM)
            _ = try await eventually("\(victim.nodeID) gone") { kill(victim.pid, 0) == 0 ? nil : true }
            let moved = try await client.refreshPlacement(7).shards[0]
            #expect(moved.primary != primary, "\(moved)")
            #expect(!moved.replicas.contains(primary), "\(moved)")
            _ = try await client.decode(7, step: 0, geometry: .tiny)
        }
    }

    /// Bad requests get an error naming the problem and leave the cluster serving.
    @Test(.timeLimit(.minutes(3)))
    func badRequestsAreRefusedClearly() async throws {
        let options = LocalCluster.Options(
            binary: LocalCluster.siblingBinary,
            workers: 2,
            childArguments: ["--log-level", "error"],
            inheritStandardError: true
        )
        try await LocalCluster.withCluster(options, logger: Self.logger) { cluster in
            try await TesseraClient.withClient(
                coordinator: cluster.coordinator,
                security: try cluster.clientSecurity(name: "a", tenant: "a"),
                logger: Self.logger
            ) { client in
                let layout = try PromptLayout(spans: [ModalitySpan(.text, start: 0, count: 40)])
                await #expect(throws: WireError.self) {
                    _ = try await client.decode(7, step: 0, geometry: .tiny)
                }
                let placed = try await client.openSequence(
                    7,
                    geometry: .tiny,
                    layout: layout,
                    policy: .full,
                    retention: 0.5
                )
                // The same open again (a retry) gets the same placement; another open under the id is refused.
                let again = try await client.openSequence(
                    7,
                    geometry: .tiny,
                    layout: layout,
                    policy: .full,
                    retention: 0.5
                )
                #expect(again == placed)
                do {
                    _ = try await client.openSequence(7, geometry: .tiny, layout: layout, policy: .full, retention: 0.4)
                    Issue.record("a second sequence under an id in use was accepted")
                } catch let error as WireError {
                    #expect(error.message.contains("already open"))
                }
                do {
                    _ = try await client.prefillSynthetic(7, workload: "podcast", seed: 1, index: 0)
                    Issue.record("an unknown workload was accepted")
                } catch let error as WireError {
                    #expect(error.code == .badRequest)
                    #expect(error.message.contains("image-qa"))
                }
                let status = try await client.status()
                #expect(status.workers.count == 2 && status.sequences == 1)
            }
        }
    }
}

/// Polls `probe` until it returns a value, or fails after `timeout` (scaled by TESSERA_TEST_TIME_SCALE).
func eventually<T: Sendable>(
    _ what: String,
    timeout: Duration = .seconds(20),
    _ probe: @Sendable () async throws -> T?
) async throws -> T {
    let scale = getenv("TESSERA_TEST_TIME_SCALE").flatMap { Double(String(cString: $0)) } ?? 1
    let deadline = ContinuousClock.now + timeout * scale
    while ContinuousClock.now < deadline {
        if let value = try await probe() { return value }
        try await Task.sleep(for: .milliseconds(50))
    }
    throw EventuallyTimeout(description: "timed out waiting for \(what)")
}

struct EventuallyTimeout: Error, CustomStringConvertible {
    var description: String
}

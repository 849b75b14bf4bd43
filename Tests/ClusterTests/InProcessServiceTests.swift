import Client
import ClusterSecurity
import ClusterTransport
import ClusterWire
import Coordinator
import KVCacheCore
import Logging
import Testing
import Worker
import Workloads

/// The coordinator and two workers as services in this process, on port 0.
@Suite struct InProcessServiceTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    @Test(.timeLimit(.minutes(2)))
    func servicesOnPortZeroServeASequence() async throws {
        try await withTestCertificates { certificates in try await Self.serveASequence(certificates) }
    }

    static func serveASequence(_ certificates: CertificateDirectory) async throws {
        let seed: UInt64 = 77
        try await withInProcessCluster(
            certificates,
            workers: 2,
            named: "in-process",
            storage: .float16,
            logger: Self.logger
        ) { address, _ in
            let owner = try certificates.security(.client, "owner", tenant: "t")
            try await TesseraClient.withClient(coordinator: address, security: owner, logger: Self.logger) { client in
                _ = try await eventually("two workers") {
                    let status = try await client.status()
                    return status.workers.filter { $0.state == "alive" }.count == 2 ? status : nil
                }
                let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: seed).sequence(0)
                // Id 0: the coordinator chooses one that no tenant can have taken.
                let placement = try await client.openSequence(
                    0,
                    geometry: .tiny,
                    layout: trace.layout,
                    policy: .vlCache(.init()),
                    retention: 0.2
                )
                let id = placement.sequenceID
                #expect(id >= 1 << 62)
                // Two workers and two copies of each shard: one shard, on both.
                #expect(placement.shards.map(\.layers) == [0..<6])
                let held = try await client.prefillSynthetic(id, workload: "image-qa", seed: seed, index: 0)
                #expect(held > 0)
                var synthetic: [[Int: [Float]]] = []
                for step in 0..<4 {
                    let outputs = try await client.decode(id, step: step, geometry: .tiny)
                    #expect(outputs.count == 6, "seed \(seed)")
                    #expect(outputs.values.allSatisfy { $0.count == 4 * 32 && $0.allSatisfy(\.isFinite) })
                    synthetic.append(outputs)
                }
                // The same trace sent inline, a layer per request: the shard is prefilled once the
                // last layer arrives, and decodes exactly as the workers' own expansion of it.
                let inline = try await client.openSequence(
                    0,
                    geometry: .tiny,
                    layout: trace.layout,
                    policy: .vlCache(.init()),
                    retention: 0.2
                ).sequenceID
                #expect(try await client.prefill(inline, trace: trace, partBytes: 1) == held)
                let steps = (0..<6).map { trace.decode(layer: $0) }
                for step in 0..<4 {
                    let inputs = Dictionary(uniqueKeysWithValues: (0..<6).map { ($0, steps[$0][step]) })
                    let outputs = try await client.decode(inline, step: step, geometry: .tiny, inputs: inputs)
                    #expect(outputs == synthetic[step], "seed \(seed) step \(step)")
                }
                // Status lists the tenant's open sequences, compressed once every copy applied its budget.
                let open = try #require(try await client.status(includeSequences: true).openSequences)
                #expect(open.map(\.id) == [id, inline].sorted())
                for sequence in open {
                    #expect(sequence.state == "decoding" && sequence.policy == CompressionPolicy.vlCache(.init()).name)
                    #expect(sequence.retention == 0.2 && sequence.shards == 1 && sequence.kvBytes > 0)
                    #expect(sequence.promptLength == trace.layout.promptLength)
                    // VL-Cache moves rows between layers: its heads keep unequal shares of the prompt.
                    let shares = try #require(sequence.headRowShares, "seed \(seed)")
                    #expect(0 < shares.min && shares.min < shares.max && shares.max <= 1, "seed \(seed): \(shares)")
                }
                #expect(try await client.status().openSequences == nil)
                #expect(try await client.close(inline) > 0)
                // Another tenant cannot touch the sequence; a step out of order is refused.
                let other = try certificates.security(.client, "other", tenant: "other")
                try await TesseraClient.withClient(coordinator: address, security: other, logger: Self.logger) {
                    other in
                    #expect(try await other.status(includeSequences: true).openSequences == [])
                    do {
                        _ = try await other.refreshPlacement(id)
                        Issue.record("another tenant read the placement")
                    } catch let error as WireError {
                        #expect(error.code == .wrongTenant)
                    }
                }
                do {
                    _ = try await client.decode(id, step: 9, geometry: .tiny)
                    Issue.record("a step out of order was accepted")
                } catch let error as WireError {
                    #expect(error.message.contains("out of order"))
                }
                #expect(try await client.close(id) > 0)
            }
        }
    }
}

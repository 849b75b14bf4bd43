import Client
import ClusterSecurity
import ClusterTransport
import ClusterWire
import Coordinator
import InMemoryTracing
import KVCacheCore
import Logging
import Testing
import Tracing
import Worker
import Workloads

/// One sequence's life as one trace across the coordinator and three workers, in this process, with
/// an in-memory tracer bound to this test's tasks only (other tests never see it).
@Suite struct TracingTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    @Test(.timeLimit(.minutes(2)))
    func aSequenceIsOneTraceAcrossProcesses() async throws {
        let tracer = InMemoryTracer(recordInjections: false, recordExtractions: false)
        try await withTestCertificates { certificates in
            try await withTracer(tracer) { try await Self.runTraced(certificates) }
        }
        let spans = tracer.finishedSpans
        let root = try #require(spans.first { $0.operationName == "test sequence" })
        // Tessera starts no trace itself: registrations, heartbeats and status polls made no spans.
        #expect(spans.allSatisfy { $0.traceID == root.traceID }, "\(spans.map(\.operationName))")
        func named(_ name: String) -> [FinishedInMemorySpan] { spans.filter { $0.operationName == name } }
        func peer(_ span: FinishedInMemorySpan) -> String? {
            if case .string(let peer) = span.attributes["tessera.peer"]?.toSpanAttribute() { return peer }
            return nil
        }
        let byID = Dictionary(spans.map { ($0.spanID, $0) }, uniquingKeysWith: { first, _ in first })

        // The client's requests are children of its span, answered as server spans.
        let open = try #require(named("open_sequence").first)
        #expect(open.parentSpanID == root.spanID && open.kind == .server)
        // The coordinator's announcement reached both holders inside the open.
        #expect(named("shard_assignment").filter { $0.parentSpanID == open.spanID }.count == 2)
        // The primary's prefill, and its forward to the replica inside it.
        let prefills = named("prefill")
        let clientPrefill = try #require(prefills.first { $0.parentSpanID == root.spanID })
        #expect(prefills.contains { $0.parentSpanID == clientPrefill.spanID && peer($0) != "client" })
        // Gather-allocate-scatter joins the trace the open came with; each copy applied its budget inside it.
        let cycle = try #require(named("budget_cycle").first)
        #expect(cycle.parentSpanID == root.spanID)
        #expect(named("assign_budget").filter { $0.parentSpanID == cycle.spanID }.count == 2)
        // Decode steps on the primary, forwarded to the replica.
        let decodes = named("decode")
        #expect(decodes.filter { $0.parentSpanID == root.spanID }.count == 2)
        #expect(decodes.contains { byID[$0.parentSpanID ?? ""]?.operationName == "decode" })
        // The primary left: the failover and the copy that restored two copies are in the trace too,
        // down to the layers the new primary streamed to the third worker.
        let failover = try #require(named("failover").first)
        #expect(failover.parentSpanID == root.spanID)
        let copy = try #require(named("re_replicate").first)
        #expect(copy.parentSpanID == root.spanID)
        let copyShard = try #require(named("copy_shard").first { $0.parentSpanID == copy.spanID })
        #expect(named("shard_transfer").filter { $0.parentSpanID == copyShard.spanID }.count == 6 + 2)
        #expect(named("close").contains { $0.parentSpanID == root.spanID })
    }

    static func runTraced(_ certificates: CertificateDirectory) async throws {
        try await withInProcessCluster(certificates, workers: 3, named: "traced", logger: Self.logger) {
            address,
            started in
            let security = try certificates.security(.client, "client", tenant: "t")
            try await TesseraClient.withClient(coordinator: address, security: security, logger: Self.logger) {
                client in
                _ = try await eventually("three workers") {
                    try await client.status().workers.filter { $0.state == "alive" }.count == 3 ? true : nil
                }
                try await withSpan("test sequence") { _ in
                    let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: 5).sequence(0)
                    let placement = try await client.openSequence(
                        0,
                        geometry: .tiny,
                        layout: trace.layout,
                        policy: .snapKV(.init()),
                        retention: 0.3
                    )
                    let id = placement.sequenceID
                    _ = try await client.prefillSynthetic(id, workload: "image-qa", seed: 5, index: 0)
                    for step in 0..<2 { _ = try await client.decode(id, step: step, geometry: .tiny) }
                    let shard = placement.shards[0]
                    let holders = Set(([shard.primary] + shard.replicas).map(\.description))
                    let members = try await client.status().workers
                    let primaryID = try #require(members.first { $0.address == shard.primary.description }?.id)
                    let thirdID = try #require(members.first { !holders.contains($0.address) }?.id)
                    try await #require(started.first { $0.configuration.nodeID == primaryID }).leave()
                    _ = try await eventually("the shard copied to the third worker") {
                        try await client.status().workers.contains { $0.id == thirdID && $0.kvBytes > 0 } ? true : nil
                    }
                    #expect(try await client.close(id) > 0)
                }
            }
        }
    }

}

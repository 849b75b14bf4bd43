import Client
import ClusterLauncher
import ClusterSecurity
import ClusterTransport
import Foundation
import KVCacheCore
import LoadGenerator
import Logging
import Subprocess
import Synchronization
import Testing
import Workloads

/// `tessera bench`'s engine against real cluster processes, on the tiny model so that it stays quick.
@Suite(.serialized) struct LoadTestingTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    static func plan(
        policies: [String],
        sequences: Int,
        concurrency: Int,
        seed: UInt64,
        audit: Double = 0.5,
        preset: WorkloadPreset = .mixed
    ) throws -> BenchPlan {
        let workload = WorkloadFile(preset: preset, geometry: .tiny)
        return BenchPlan(
            workloadName: preset.rawValue,
            workload: workload,
            policies: try policies.map { name in
                let policy = try CompressionPolicy.named(name)
                return .init(name: name, policy: policy, retention: policy == .full ? 1 : 0.1)
            },
            loop: .closed(concurrency: concurrency),
            stop: .sequences(sequences),
            seed: seed,
            auditFraction: audit
        )
    }

    static func cluster(workers: Int = 3, coordinator: [String] = []) -> LocalCluster.Options {
        var options = LocalCluster.Options(
            binary: LocalCluster.siblingBinary,
            workers: workers,
            childArguments: ["--log-level", "error"]
        )
        options.coordinatorArguments = coordinator
        return options
    }

    /// A short closed-loop run: every sequence completes, tokens flow, compression saves bytes and the
    /// audited sequences report fidelity; the per-worker bytes the bench samples are what
    /// `tessera status` prints and what the sequences' own decode replies add up to.
    @Test(.timeLimit(.minutes(5)))
    func shortBenchCompletesAndAgreesWithStatus() async throws {
        let seed: UInt64 = 7_001
        let plan = try Self.plan(policies: ["full", "vl-cache"], sequences: 6, concurrency: 2, seed: seed)
        try await LocalCluster.withCluster(Self.cluster(), logger: Self.logger) { cluster in
            let (report, samples) = try await LoadRunner.run(
                plan,
                coordinator: cluster.coordinator,
                security: try cluster.clientSecurity(name: "bench", tenant: "bench"),
                workers: 3,
                logger: Self.logger
            )
            let byName = Dictionary(uniqueKeysWithValues: report.policies.map { ($0.policy, $0) })
            let full = try #require(byName["full"], "seed \(seed)")
            let compressed = try #require(byName["vl-cache"], "seed \(seed)")
            for result in report.policies {
                #expect(result.errors == 0, "seed \(seed): \(result.policy) had errors: \(result.errorMessages)")
                #expect(result.sequences == 6, "seed \(seed)")
                #expect(result.tokensPerSecond > 0, "seed \(seed)")
                #expect(result.decodeP50Micros > 0 && result.decodeP50Micros <= result.decodeP99Micros)
                #expect(result.workers.count == 3, "seed \(seed): \(result.workers)")
                #expect(result.peakKVBytes > 0, "seed \(seed)")
            }
            #expect(full.saving.magnitude < 1e-9, "the full cache saves nothing, seed \(seed)")
            #expect(compressed.saving > 0.5, "seed \(seed): saving \(compressed.saving)")
            #expect(compressed.auditedSequences > 0, "seed \(seed)")
            #expect(full.outputError.map { $0 < 1e-6 } ?? false, "the full cache is its own reference, seed \(seed)")
            #expect(compressed.outputError.map { $0 > 0 && $0 < 2 } ?? false, "seed \(seed)")
            #expect(samples.contains { $0.policy == "vl-cache" && $0.kvBytes > 0 }, "seed \(seed)")

            // Hold three compressed sequences open and compare the three views of the footprint.
            try await TesseraClient.withClient(
                coordinator: cluster.coordinator,
                security: try cluster.clientSecurity(name: "hold", tenant: "hold"),
                logger: Self.logger
            ) { client in
                let workload = WorkloadFile(preset: .imageQA, geometry: .tiny)
                var held: UInt64 = 0
                for index in 0..<3 {
                    let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: seed).sequence(index)
                    let id = UInt64(90 + index)
                    _ = try await client.openSequence(
                        id,
                        geometry: .tiny,
                        layout: trace.layout,
                        policy: try CompressionPolicy.named("vl-cache"),
                        retention: 0.1,
                        decodeTokens: 1
                    )
                    _ = try await client.prefillSynthetic(
                        id,
                        workload: "image-qa",
                        seed: seed,
                        index: index,
                        settings: workload.traceSettings
                    )
                    held += try await client.decodeStep(id, step: 0, geometry: .tiny).kvBytes
                }
                // Each shard has two copies (replication 2), each holding what the decode replies report.
                let expected = 2 * held
                let status = try await eventually("heartbeats report what the sequences hold") {
                    let status = try await client.status()
                    return status.totalKVBytes == expected ? status : nil
                }
                let sampled = FootprintSampler.samples(status, policy: "hold", elapsedMillis: 0)
                let printed = try await Self.statusJSON(cluster)
                #expect(sampled.reduce(0) { $0 + $1.kvBytes } == expected, "seed \(seed)")
                for sample in sampled {
                    let worker = try #require(printed.workers.first { $0.id == sample.worker })
                    #expect(worker.kvBytes == sample.kvBytes, "seed \(seed): \(sample.worker)")
                    let address = try #require(cluster.workers.first { $0.nodeID == sample.worker }).address
                    let copies = try await client.shardCopies(on: address)
                    #expect(copies.reduce(0) { $0 + $1.kvBytes } == sample.kvBytes, "seed \(seed): \(sample.worker)")
                    #expect(sample.rssBytes > 0, "seed \(seed): workers report their RSS")
                }
            }
        }
    }

    /// Under a limit far below the offered load (three uncompressed single-image sequences fit, six
    /// are offered at once), admission tightens and refuses, the bench waits out the refusals, and
    /// the coordinator's accounted bytes, read every 20 ms while the bench runs, never exceed the
    /// limit. (The bench's own footprint samples sum the workers' last heartbeats, taken at different
    /// instants: a close on one worker and the next prefill on another can both show in one sum.)
    @Test(.timeLimit(.minutes(5)))
    func tightLimitIsNeverExceeded() async throws {
        let seed: UInt64 = 7_002
        let limit: UInt64 = 1_500_000
        var tight = try Self.plan(
            policies: ["vl-cache"],
            sequences: 16,
            concurrency: 6,
            seed: seed,
            audit: 0,
            preset: .imageQA
        )
        tight.sampleInterval = .milliseconds(50)
        let plan = tight
        let options = Self.cluster(coordinator: ["--memory-limit-bytes", "\(limit)", "--floor-ratio", "0.02"])
        try await LocalCluster.withCluster(options, logger: Self.logger) { cluster in
            let security = try cluster.clientSecurity(name: "bench", tenant: "bench")
            let done = Atomic<Bool>(false)
            async let accounted: [ClusterStatus] = TesseraClient.withClient(
                coordinator: cluster.coordinator,
                security: security,
                nodeID: "watch",
                logger: Self.logger
            ) { client in
                var seen: [ClusterStatus] = []
                while !done.load(ordering: .relaxed) {
                    let status = try await client.status(includeSequences: true)
                    #expect(status.memoryLimitBytes == limit)
                    seen.append(status)
                    try await Task.sleep(for: .milliseconds(20))
                }
                return seen
            }
            let (report, _) = try await LoadRunner.run(
                plan,
                coordinator: cluster.coordinator,
                security: security,
                workers: 3,
                logger: Self.logger
            )
            done.store(true, ordering: .relaxed)
            let result = try #require(report.policies.first)
            #expect(result.refusals > 0, "seed \(seed): the limit should refuse some opens")
            #expect(result.errors == 0, "seed \(seed): refusals are retried, not errors: \(result.errorMessages)")
            #expect(result.sequences == 16, "seed \(seed)")
            let readings = try await accounted
            #expect(readings.count > 5, "seed \(seed): too few readings to judge")
            #expect(
                readings.contains { $0.accountedKVBytes > limit / 2 },
                "seed \(seed): the load should fill the cluster"
            )
            for (index, reading) in readings.enumerated() {
                #expect(
                    reading.accountedKVBytes <= limit,
                    "seed \(seed): \(reading.accountedKVBytes) accounted at reading \(index), limit \(limit); open: \(reading.openSequences ?? [])"
                )
            }
        }
    }

    static func statusJSON(_ cluster: LocalCluster) async throws -> ClusterStatus {
        let certificates = try #require(cluster.certificates)
        let result = try await run(
            .path(LocalCluster.siblingBinary),
            arguments: [
                "status", "--coordinator", cluster.coordinator.description, "--json", "--certs", certificates.path,
                "--cert-name", "hold",
            ],
            input: .none,
            output: .string(limit: 1 << 20),
            error: .discarded
        )
        #expect(result.terminationStatus.isSuccess)
        return try JSONDecoder().decode(ClusterStatus.self, from: Data(result.standardOutput.utf8))
    }
}

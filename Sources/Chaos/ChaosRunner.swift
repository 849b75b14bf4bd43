import Client
import ClusterLauncher
import ClusterTransport
import Evaluation
import KVCacheCore
public import Logging
public import SystemPackage
import Workloads

#if canImport(Glibc)
import Glibc
#endif

/// What a chaos run found. Encoded as the `--json` file.
public struct ChaosReport: Sendable, Codable {
    public struct AppliedFault: Sendable, Codable {
        public var beforeStep: Int
        public var action: String
        public var worker: String
        public var pid: Int32
    }

    public var scenario: String
    public var faults: [AppliedFault]
    /// Sequences that failed a decode step (must be 0).
    public var sequencesLost: Int
    /// Acknowledged decode steps whose outputs differ from the fault-free run (must be 0).
    public var missingWrites: Int
    /// Every acknowledged output equals the fault-free run of the same seed, bit for bit.
    public var outputsIdentical: Bool
    /// Every shard's current copies hold the same bytes (equal digests).
    public var replicasConsistent: Bool
    /// After every sequence closed, the cluster accounts no bytes.
    public var accountingConsistent: Bool
    /// Child processes still running after the cluster stopped (must be 0).
    public var processesLeft: Int
    /// Per fault: from the fault until the next decode step of every sequence succeeded.
    public var recoveryMillis: [Int]
    public var passed: Bool
}

/// Runs a scenario: a local cluster, lockstep decode traffic, the scenario's faults by signal, and
/// the checks of the invariants (ARCHITECTURE §3) against a fault-free run computed in this process.
public enum ChaosRunner {
    public static func run(
        _ scenario: ChaosScenario, binary: FilePath, logger: Logger, progress: @escaping @Sendable (String) -> Void = { _ in }
    ) async throws -> ChaosReport {
        var options = LocalCluster.Options(
            binary: binary, workers: scenario.workers, childArguments: ["--log-level", "critical"],
            inheritStandardError: false)
        options.coordinatorArguments = ["--replication", "\(scenario.replication)"]
        options.workerArguments = scenario.workerFaults.map { ["--faults", $0] } ?? []
        options.toleratesWorkerExits = true
        let launch = options
        let (report, pids) = try await LocalCluster.withCluster(launch, logger: logger) { cluster in
            let pids = [cluster.coordinatorPID] + cluster.workers.map(\.pid)
            let report = try await TesseraClient.withClient(
                coordinator: cluster.coordinator, tenant: "chaos", nodeID: "chaos", logger: logger
            ) { client in
                try await drive(scenario, cluster: cluster, client: client, progress: progress)
            }
            return (report, pids)
        }
        var final = report
        final.processesLeft = pids.filter { kill($0, 0) == 0 }.count
        final.passed = final.sequencesLost == 0 && final.missingWrites == 0 && final.outputsIdentical
            && final.replicasConsistent && final.accountingConsistent && final.processesLeft == 0
        return final
    }

    static func drive(
        _ scenario: ChaosScenario, cluster: LocalCluster, client: TesseraClient,
        progress: @escaping @Sendable (String) -> Void
    ) async throws -> ChaosReport {
        let deadline = ContinuousClock.now + .seconds(30)
        while try await client.status().workers.filter({ $0.state == "alive" }).count < scenario.workers {
            guard ContinuousClock.now < deadline else { throw ChaosError("the workers did not all register") }
            try await Task.sleep(for: .milliseconds(50))
        }
        var settings = TraceSettings()
        settings.decodeSteps = scenario.decodeTokens
        let generator = TraceGenerator(preset: scenario.preset, geometry: scenario.geometry, settings: settings, seed: scenario.seed)
        let traces = (0..<scenario.sequences).map { generator.sequence($0) }
        progress("computing the fault-free run of \(scenario.sequences) sequences in this process")
        let expected = try traces.map { try ReferenceDecode.outputs($0, policy: scenario.policy, retention: scenario.budget) }
        for (index, trace) in traces.enumerated() {
            _ = try await client.openSequence(
                UInt64(index), geometry: scenario.geometry, layout: trace.layout, policy: scenario.policy,
                retention: scenario.budget, decodeTokens: scenario.decodeTokens)
            _ = try await client.prefillSynthetic(
                UInt64(index), workload: scenario.preset.rawValue, seed: scenario.seed, index: index, settings: settings)
        }
        var applied: [ChaosReport.AppliedFault] = []
        var lost = Set<Int>()
        var mismatches = 0
        var recovery: [Int] = []
        var waitingSince: [ContinuousClock.Instant] = []
        var previous: (nodeID: String, pid: Int32)?
        for step in 0..<scenario.decodeTokens {
            for fault in scenario.faults where fault.beforeStep == step {
                let target = try await resolve(fault.target, cluster: cluster, client: client, previous: previous)
                _ = kill(target.pid, fault.action.signal)
                previous = target
                applied.append(.init(beforeStep: step, action: fault.action.rawValue, worker: target.nodeID, pid: target.pid))
                waitingSince.append(.now)
                progress("step \(step): \(fault.action.rawValue) \(target.nodeID) (pid \(target.pid))")
            }
            let live = (0..<traces.count).filter { !lost.contains($0) }
            let outcomes = await withTaskGroup(of: (Int, [Int: [Float]]?).self) { group in
                for index in live {
                    group.addTask {
                        do {
                            return (index, try await client.decode(UInt64(index), step: step, geometry: scenario.geometry))
                        } catch {
                            progress("sequence \(index) failed at step \(step): \(error)")
                            return (index, nil)
                        }
                    }
                }
                var all: [(Int, [Int: [Float]]?)] = []
                for await outcome in group { all.append(outcome) }
                return all
            }
            for (index, outputs) in outcomes {
                guard let outputs else {
                    lost.insert(index)
                    continue
                }
                for layer in 0..<scenario.geometry.layers where outputs[layer] != expected[index][step][layer] {
                    mismatches += 1
                }
            }
            recovery += waitingSince.map { Int($0.duration(to: .now) / .milliseconds(1)) }
            waitingSince = []
        }
        var consistent = true
        let liveWorkers = try await client.status().workers.filter { $0.state == "alive" }.map(\.address)
        for index in 0..<traces.count where !lost.contains(index) {
            let placement = try await client.refreshPlacement(UInt64(index))
            for shard in placement.shards {
                var digests = Set<UInt64>()
                for holder in [shard.primary] + shard.replicas where liveWorkers.contains(holder.description) {
                    for copy in try await client.shardCopies(on: holder) where copy.sequenceID == UInt64(index) {
                        digests.insert(copy.digest)
                    }
                }
                if digests.count != 1 { consistent = false }
            }
        }
        for index in 0..<traces.count { _ = try? await client.close(UInt64(index)) }
        var drained = false
        let drainDeadline = ContinuousClock.now + .seconds(15)
        while ContinuousClock.now < drainDeadline {
            let status = try await client.status()
            if status.sequences == 0 && status.totalKVBytes == 0 {
                drained = true
                break
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        return ChaosReport(
            scenario: scenario.name, faults: applied, sequencesLost: lost.count, missingWrites: mismatches,
            outputsIdentical: mismatches == 0 && lost.isEmpty, replicasConsistent: consistent,
            accountingConsistent: drained, processesLeft: 0, recoveryMillis: recovery, passed: false)
    }

    static func resolve(
        _ target: ChaosScenario.Target, cluster: LocalCluster, client: TesseraClient,
        previous: (nodeID: String, pid: Int32)?
    ) async throws -> (nodeID: String, pid: Int32) {
        func worker(at address: NodeAddress) throws -> (nodeID: String, pid: Int32) {
            guard let worker = cluster.workers.first(where: { $0.address == address }) else {
                throw ChaosError("no worker listens on \(address)")
            }
            return (worker.nodeID, worker.pid)
        }
        switch target {
        case .primary:
            return try worker(at: try await client.refreshPlacement(0).shards[0].primary)
        case .replica:
            guard let replica = try await client.refreshPlacement(0).shards[0].replicas.first else {
                throw ChaosError("sequence 0's first shard has no replica to hit")
            }
            return try worker(at: replica)
        case .previous:
            guard let previous else { throw ChaosError("target 'previous' needs an earlier fault") }
            return previous
        case .node(let id):
            guard let worker = cluster.workers.first(where: { $0.nodeID == id }) else {
                throw ChaosError("the cluster has no \(id); it has \(cluster.workers.map(\.nodeID).joined(separator: ", "))")
            }
            return (worker.nodeID, worker.pid)
        }
    }
}

extension ChaosScenario.Action {
    var signal: Int32 {
        switch self {
        case .kill: SIGKILL
        case .pause: SIGSTOP
        case .resume: SIGCONT
        case .terminate: SIGTERM
        }
    }
}

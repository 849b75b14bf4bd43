import Client
import ClusterAdmin
public import ClusterLauncher
import ClusterSecurity
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
    /// Why each lost sequence was lost: its index, the step and the error.
    public var losses: [String]
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
    /// Writes the client sent again (after NOT_PRIMARY, STALE_EPOCH, UNAVAILABLE or a broken connection).
    public var requestsRetried: Int
    /// After the last step, every shard got back to the replication factor (or to as many copies as
    /// there are live workers) by re-replication.
    public var replicationRestored: Bool
    /// After the last step, every running worker process is a live member (a restarted, resumed or
    /// healed worker rejoined).
    public var workersRejoined: Bool
    /// From the last step until both held.
    public var healedMillis: Int
    public var passed: Bool
}

/// One sequence's decode step under chaos: its outputs, or why it failed.
struct StepOutcome: Sendable {
    var index: Int
    var outputs: [Int: [Float]]?
    var failure: String?
}

/// Runs a scenario: a local cluster, lockstep decode traffic, the scenario's faults by signal, and
/// the checks of the invariants (ARCHITECTURE §3) against a fault-free run computed in this process.
public enum ChaosRunner {
    /// The id of the scenario's sequence `index` (0 would ask the coordinator to choose one).
    static func sequenceID(_ index: Int) -> UInt64 { UInt64(index) + 1 }

    /// Runs `scenario` with the cluster's processes logging at `childLogLevel` to this process's
    /// standard error (nothing at `critical`, the default), or to a file per process in
    /// `logDirectory` when one is given.
    public static func run(
        _ scenario: ChaosScenario,
        binary: FilePath,
        logger: Logger,
        childLogLevel: String = "critical",
        logDirectory: FilePath? = nil,
        hosts: RunningHosts? = nil,
        progress: @escaping @Sendable (String) -> Void = { _ in }
    ) async throws -> ChaosReport {
        var options = LocalCluster.Options(
            binary: binary,
            workers: scenario.workers,
            childArguments: ["--log-level", childLogLevel],
            inheritStandardError: childLogLevel != "critical"
        )
        options.standardErrorDirectory = logDirectory
        options.hosts = hosts
        options.coordinatorArguments = ["--replication", "\(scenario.replication)"]
        options.workerArguments = scenario.workerFaults.map { ["--faults", $0] } ?? []
        options.toleratesWorkerExits = true
        let launch = options
        let (report, pids) = try await LocalCluster.withCluster(launch, logger: logger) { cluster in
            let report = try await TesseraClient.withClient(
                coordinator: cluster.coordinator,
                security: try cluster.clientSecurity(name: "chaos", tenant: "chaos"),
                tenant: "chaos",
                nodeID: "chaos",
                logger: logger
            ) { client in
                try await drive(scenario, cluster: cluster, client: client, progress: progress)
            }
            return (report, cluster.everyPID)
        }
        var final = report
        final.processesLeft = pids.filter { kill($0, 0) == 0 }.count
        final.passed =
            final.sequencesLost == 0 && final.missingWrites == 0 && final.outputsIdentical
            && final.replicasConsistent && final.accountingConsistent && final.replicationRestored
            && final.workersRejoined && final.processesLeft == 0
        return final
    }

    static func drive(
        _ scenario: ChaosScenario,
        cluster: LocalCluster,
        client: TesseraClient,
        progress: @escaping @Sendable (String) -> Void
    ) async throws -> ChaosReport {
        let deadline = ContinuousClock.now + .seconds(30)
        while try await client.status().workers.filter({ $0.state == "alive" }).count < scenario.workers {
            guard ContinuousClock.now < deadline else { throw ChaosError("the workers did not all register") }
            try await Task.sleep(for: .milliseconds(50))
        }
        var settings = TraceSettings()
        settings.decodeSteps = scenario.decodeTokens
        let generator = TraceGenerator(
            preset: scenario.preset,
            geometry: scenario.geometry,
            settings: settings,
            seed: scenario.seed
        )
        let traces = (0..<scenario.sequences).map { generator.sequence($0) }
        progress("computing the fault-free run of \(scenario.sequences) sequences in this process")
        let expected = try traces.map {
            try ReferenceDecode.outputs($0, policy: scenario.policy, retention: scenario.budget)
        }
        for (index, trace) in traces.enumerated() {
            _ = try await client.openSequence(
                Self.sequenceID(index),
                geometry: scenario.geometry,
                layout: trace.layout,
                policy: scenario.policy,
                retention: scenario.budget,
                decodeTokens: scenario.decodeTokens
            )
            _ = try await client.prefillSynthetic(
                Self.sequenceID(index),
                workload: scenario.preset.rawValue,
                seed: scenario.seed,
                index: index,
                settings: settings
            )
        }
        var applied: [ChaosReport.AppliedFault] = []
        var lost = Set<Int>()
        var losses: [String] = []
        var mismatches = 0
        var recovery: [Int] = []
        var waitingSince: [ContinuousClock.Instant] = []
        var lastFault: ContinuousClock.Instant?
        var previous: (nodeID: String, pid: Int32)?
        for step in 0..<scenario.decodeTokens {
            for fault in scenario.faults where fault.beforeStep == step {
                if let lastFault { try await Task.sleep(until: lastFault + .milliseconds(fault.afterMillis)) }
                let target = try await apply(
                    fault,
                    cluster: cluster,
                    client: client,
                    previous: previous,
                    progress: progress
                )
                lastFault = .now
                previous = target
                applied.append(
                    .init(beforeStep: step, action: fault.action.rawValue, worker: target.nodeID, pid: target.pid)
                )
                waitingSince.append(.now)
                progress("step \(step): \(fault.action.rawValue) \(target.nodeID) (pid \(target.pid))")
            }
            let live = (0..<traces.count).filter { !lost.contains($0) }
            // Outcomes are a plain struct: a task group of (Int, Result<_, any Error>) tuples handed
            // back garbage indices in release builds (Swift 6.3.1).
            let outcomes = await withTaskGroup(of: StepOutcome.self) { group in
                for index in live {
                    group.addTask {
                        do {
                            let outputs = try await client.decode(
                                Self.sequenceID(index),
                                step: step,
                                geometry: scenario.geometry
                            )
                            return StepOutcome(index: index, outputs: outputs, failure: nil)
                        } catch {
                            return StepOutcome(index: index, outputs: nil, failure: "\(error)")
                        }
                    }
                }
                var all: [StepOutcome] = []
                for await outcome in group { all.append(outcome) }
                return all.sorted { $0.index < $1.index }
            }
            for outcome in outcomes {
                guard let outputs = outcome.outputs else {
                    lost.insert(outcome.index)
                    losses.append("sequence \(outcome.index) at step \(step): \(outcome.failure ?? "no outputs")")
                    progress(losses.last!)
                    continue
                }
                for layer in 0..<scenario.geometry.layers where outputs[layer] != expected[outcome.index][step][layer] {
                    mismatches += 1
                }
            }
            recovery += waitingSince.map { Int($0.duration(to: .now) / .milliseconds(1)) }
            waitingSince = []
        }
        let lastStep = ContinuousClock.now
        progress("waiting for every worker to rejoin and every shard to get its copies back")
        let health = try await waitUntilHealed(client, cluster: cluster, within: .seconds(30))
        let healedMillis = Int(lastStep.duration(to: .now) / .milliseconds(1))
        var consistent = true
        let liveWorkers = try await client.status().workers.filter { $0.state == "alive" }.map(\.address)
        for index in 0..<traces.count where !lost.contains(index) {
            let placement = try await client.refreshPlacement(Self.sequenceID(index))
            for shard in placement.shards {
                var digests = Set<UInt64>()
                for holder in [shard.primary] + shard.replicas where liveWorkers.contains(holder.description) {
                    for copy in try await client.shardCopies(on: holder)
                    where copy.sequenceID == placement.sequenceID {
                        digests.insert(copy.digest)
                    }
                }
                if digests.count != 1 { consistent = false }
            }
        }
        for index in 0..<traces.count { _ = try? await client.close(Self.sequenceID(index)) }
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
            scenario: scenario.name,
            faults: applied,
            sequencesLost: lost.count,
            losses: losses,
            missingWrites: mismatches,
            outputsIdentical: mismatches == 0 && lost.isEmpty,
            replicasConsistent: consistent,
            accountingConsistent: drained,
            processesLeft: 0,
            recoveryMillis: recovery,
            requestsRetried: client.retriedRequests,
            replicationRestored: health.replicated,
            workersRejoined: health.rejoined,
            healedMillis: healedMillis,
            passed: false
        )
    }

    /// Applies one fault; returns the process it hit (for a restart, the new one).
    static func apply(
        _ fault: ChaosScenario.Fault,
        cluster: LocalCluster,
        client: TesseraClient,
        previous: (nodeID: String, pid: Int32)?,
        progress: @escaping @Sendable (String) -> Void
    ) async throws -> (nodeID: String, pid: Int32) {
        if fault.target == .coordinator, fault.action == .restart {
            let new = try await cluster.restartCoordinator()
            return (new.nodeID, new.pid)
        }
        let target = try await resolve(fault.target, cluster: cluster, client: client, previous: previous)
        switch fault.action {
        case .kill, .pause, .resume, .terminate:
            _ = kill(target.pid, fault.action.signal!)
            return target
        case .restart:
            // As an operator would: take the next worker down only once the last one's shards are
            // fully replicated again.
            let health = try await waitUntilHealed(client, cluster: cluster, within: .seconds(30))
            guard health.replicated && health.rejoined else {
                throw ChaosError(
                    "the cluster had not recovered from the last restart 30 s later; not restarting \(target.nodeID)"
                )
            }
            let new = try await cluster.restartWorker(target.nodeID)
            return (new.nodeID, new.pid)
        case .partition, .heal:
            guard let worker = cluster.workers.first(where: { $0.nodeID == target.nodeID }) else {
                throw ChaosError("\(target.nodeID) is not running")
            }
            let cut = fault.action == .partition
            if let hosts = cluster.hosts {
                // On hosts, a partition is the kernel's: the worker's host link goes down.
                let host = hosts.topology.host(of: target.nodeID)
                do { try await hosts.setLink(host: host, up: !cut) } catch {
                    throw ChaosError("cannot \(fault.action.rawValue) \(target.nodeID) (host \(host)): \(error)")
                }
                return target
            }
            do {
                _ = try await AdminClient.put(
                    host: cluster.coordinatorProcess.adminHost,
                    port: cluster.coordinatorProcess.adminPort,
                    path: "/faults",
                    body: cut ? "drop=1,peer=\(target.nodeID)" : "none",
                    token: cluster.adminToken
                )
                _ = try await AdminClient.put(
                    host: worker.adminHost,
                    port: worker.adminPort,
                    path: "/faults",
                    body: cut ? "drop=1" : "none",
                    token: cluster.adminToken
                )
            } catch {
                throw ChaosError("cannot \(fault.action.rawValue) \(target.nodeID): \(error)")
            }
            return target
        case .degrade, .restore:
            guard let hosts = cluster.hosts else { throw ChaosError("\(fault.action.rawValue) needs --hosts") }
            let host = hosts.topology.host(of: target.nodeID)
            do { try await hosts.shape(host: host, fault.action == .degrade ? fault.network : nil) } catch {
                throw ChaosError("cannot \(fault.action.rawValue) \(target.nodeID) (host \(host)): \(error)")
            }
            return target
        }
    }

    /// Polls the coordinator until no shard is under-replicated and every running worker process is a
    /// live member, for at most `limit`; returns which of the two held at the end.
    static func waitUntilHealed(
        _ client: TesseraClient,
        cluster: LocalCluster,
        within limit: Duration
    ) async throws -> (replicated: Bool, rejoined: Bool) {
        let deadline = ContinuousClock.now + limit
        var health = (replicated: false, rejoined: false)
        while ContinuousClock.now < deadline {
            if let status = try? await client.status() {
                let running = cluster.workers.filter { kill($0.pid, 0) == 0 }.count
                health = (
                    status.underReplicatedShards == 0, status.workers.filter { $0.state == "alive" }.count == running
                )
                if health.replicated && health.rejoined { break }
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        return health
    }

    static func resolve(
        _ target: ChaosScenario.Target,
        cluster: LocalCluster,
        client: TesseraClient,
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
            return try worker(at: try await client.refreshPlacement(Self.sequenceID(0)).shards[0].primary)
        case .replica:
            guard let replica = try await client.refreshPlacement(Self.sequenceID(0)).shards[0].replicas.first else {
                throw ChaosError("sequence 0's first shard has no replica to hit")
            }
            return try worker(at: replica)
        case .previous:
            guard let previous else { throw ChaosError("target 'previous' needs an earlier fault") }
            return previous
        case .node(let id):
            guard let worker = cluster.workers.first(where: { $0.nodeID == id }) else {
                throw ChaosError(
                    "the cluster has no \(id); it has \(cluster.workers.map(\.nodeID).joined(separator: ", "))"
                )
            }
            return (worker.nodeID, worker.pid)
        case .coordinator:
            return ("coordinator", cluster.coordinatorPID)
        }
    }
}

extension ChaosScenario.Action {
    /// The signal a process fault sends; nil for the other actions.
    var signal: Int32? {
        switch self {
        case .kill: SIGKILL
        case .pause: SIGSTOP
        case .resume: SIGCONT
        case .terminate: SIGTERM
        case .restart, .partition, .heal, .degrade, .restore: nil
        }
    }
}

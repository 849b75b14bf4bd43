import ArgumentParser
import Chaos
import ClusterLauncher
import Logging

struct ChaosCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chaos",
        abstract: "Run a fault-injection scenario on a local cluster and check that nothing was lost.",
        discussion: """
            Starts a local cluster as the scenario describes (workers, replication), opens and prefills \
            its sequences, decodes them in lockstep and applies each fault before its step: kill, pause, \
            resume, terminate (SIGKILL, SIGSTOP, SIGCONT, SIGTERM), restart (a new process with the same \
            node id; the coordinator on the same port), partition and heal (fault plans set on the \
            admin endpoints: the coordinator and the worker drop each other's frames; with --hosts, the \
            worker's host link goes down and up), degrade and restore (with --hosts only: the host link \
            gets the fault's `network` profile, then the cluster's again), aimed at the \
            primary or a replica of sequence 0's first shard, the previously hit worker, a worker by id \
            or the coordinator (restart, pause, resume); a fault's afterMillis holds it back until that \
            long after the previous one. Then it checks: sequences lost (0, each with its reason), \
            acknowledged writes missing (0), decode outputs bit-identical to the same seed run \
            fault-free in this process, every shard back to its replication factor, every running \
            worker a live member again, replicas' digests equal, accounting back to zero after closing, \
            no process left behind; and reports the recovery time per fault and the writes retried. \
            Exit code 1 when an invariant fails.

            Scenarios live in cluster/scenarios/, e.g.:
              tessera chaos --scenario cluster/scenarios/kill-primary.yaml --json chaos.json
            """
    )

    @Option(help: "The scenario file (YAML).")
    var scenario: String

    @Option(help: "Write the report as JSON to this path.")
    var json: String?

    @Option(
        help:
            "Log level of the cluster's processes (their logs go to standard error): trace, debug, info, notice, warning, error or critical (silent)."
    )
    var logLevel = "critical"

    @OptionGroup(title: "Hosts (partitions become a host's link going down)") var hosts: HostOptions

    func run() async throws {
        let loaded: ChaosScenario
        do { loaded = try ChaosScenario.load(path: scenario) } catch { throw usageFailure("--scenario: \(error)") }
        let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
        guard levels.contains(logLevel) else {
            throw usageFailure("unknown --log-level '\(logLevel)'; allowed: \(levels.joined(separator: ", "))")
        }
        guard !loaded.changesLinks || hosts.hosts != nil else {
            throw usageFailure("--scenario \(scenario): degrade and restore change hosts' links; give --hosts")
        }
        let topology = try await hosts.topology(adjustable: loaded.changesLinks)
        Terminal.error(
            "[tessera] chaos \(loaded.name): \(loaded.workers) workers, replication \(loaded.replication), "
                + "\(loaded.sequences) sequences × \(loaded.decodeTokens) steps, \(loaded.faults.count) fault(s)\n"
        )
        let logger = Logger(label: "tessera.chaos")
        let childLogLevel = logLevel
        let report = try await hosts.run(on: topology, logger: logger) { running in
            try await ChaosRunner.run(
                loaded,
                binary: LocalCluster.currentBinary,
                logger: logger,
                childLogLevel: childLogLevel,
                hosts: running
            ) { Terminal.error("[tessera] \($0)\n") }
        }
        let faults = report.faults.map { "\($0.action) \($0.worker) before step \($0.beforeStep)" }.joined(
            separator: "; "
        )
        Terminal.output(
            """
            scenario             \(report.scenario)
            faults               \(faults)
            sequences lost       \(report.sequencesLost)
            missing writes       \(report.missingWrites)
            outputs identical    \(report.outputsIdentical)
            replicas consistent  \(report.replicasConsistent)
            replication restored \(report.replicationRestored)
            workers rejoined     \(report.workersRejoined) (healed \(report.healedMillis) ms after the last step)
            accounting back to 0 \(report.accountingConsistent)
            processes left       \(report.processesLeft)
            recovery ms          \(report.recoveryMillis.map(String.init).joined(separator: ", "))
            requests retried     \(report.requestsRetried)
            result               \(report.passed ? "PASSED" : "FAILED")

            """
        )
        if let json { try writeJSONReport(report, to: json) }
        if !report.passed { throw ExitCode(1) }
    }
}

import ArgumentParser
import Chaos
import ClusterLauncher
import FoundationEssentials
import Logging

struct ChaosCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chaos",
        abstract: "Run a fault-injection scenario on a local cluster and check that nothing was lost.",
        discussion: """
            Starts a local cluster as the scenario describes (workers, replication), opens and prefills
            its sequences, decodes them in lockstep and applies each fault (SIGKILL, SIGSTOP, SIGCONT or
            SIGTERM to the primary or a replica of sequence 0's first shard, the previously hit worker,
            or a worker by id) before its step. Then it checks: sequences lost (0), acknowledged writes
            missing (0), decode outputs bit-identical to the same seed run fault-free in this process,
            replicas' digests equal, accounting back to zero after closing, no process left behind;
            and reports the recovery time per fault. Exit code 1 when an invariant fails.

            Scenarios live in cluster/scenarios/, e.g.:
              tessera chaos --scenario cluster/scenarios/kill-primary.yaml --json chaos.json
            """
    )

    @Option(help: "The scenario file (YAML).")
    var scenario: String

    @Option(help: "Write the report as JSON to this path.")
    var json: String?

    func run() async throws {
        let loaded: ChaosScenario
        do { loaded = try ChaosScenario.load(path: scenario) } catch { throw usageFailure("--scenario: \(error)") }
        Terminal.error(
            "[tessera] chaos \(loaded.name): \(loaded.workers) workers, replication \(loaded.replication), "
                + "\(loaded.sequences) sequences × \(loaded.decodeTokens) steps, \(loaded.faults.count) fault(s)\n")
        let report = try await ChaosRunner.run(
            loaded, binary: LocalCluster.currentBinary, logger: Logger(label: "tessera.chaos")
        ) { Terminal.error("[tessera] \($0)\n") }
        let faults = report.faults.map { "\($0.action) \($0.worker) before step \($0.beforeStep)" }.joined(separator: "; ")
        Terminal.output(
            """
            scenario             \(report.scenario)
            faults               \(faults)
            sequences lost       \(report.sequencesLost)
            missing writes       \(report.missingWrites)
            outputs identical    \(report.outputsIdentical)
            replicas consistent  \(report.replicasConsistent)
            accounting back to 0 \(report.accountingConsistent)
            processes left       \(report.processesLeft)
            recovery ms          \(report.recoveryMillis.map(String.init).joined(separator: ", "))
            result               \(report.passed ? "PASSED" : "FAILED")

            """)
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            do {
                try encoder.encode(report).write(to: URL(filePath: json))
            } catch {
                throw ValidationError("cannot write \(json): \(error)")
            }
        }
        if !report.passed { throw ExitCode(1) }
    }
}

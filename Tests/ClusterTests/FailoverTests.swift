import Chaos
import ClusterLauncher
import Logging
import Testing

/// The fault-injection scenarios of `cluster/scenarios/`, each a real cluster of processes hit by real
/// signals under lockstep decode traffic (see `ChaosRunner` for the checks).
@Suite(.serialized) struct FailoverTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    static func scenario(_ name: String) -> String {
        let file = "\(#filePath)"
        let root = file.split(separator: "/").dropLast(3).joined(separator: "/")
        return "/\(root)/cluster/scenarios/\(name).yaml"
    }

    @Test(
        .timeLimit(.minutes(3)),
        arguments: [
            "kill-primary", "kill-replica", "kill-two", "pause-primary", "corrupt-frames", "partition-worker",
            "rolling-restart", "coordinator-restart", "pause-coordinator",
        ]
    )
    func scenarioLosesNothing(name: String) async throws {
        let scenario = try ChaosScenario.load(path: Self.scenario(name))
        let report = try await ChaosRunner.run(scenario, binary: LocalCluster.siblingBinary, logger: Self.logger)
        let context = "\(name), seed \(scenario.seed): \(report)"
        #expect(report.faults.count == scenario.faults.count, "\(context)")
        #expect(report.sequencesLost == 0, "\(context)")
        #expect(report.missingWrites == 0, "\(context)")
        #expect(report.outputsIdentical, "\(context)")
        #expect(report.replicasConsistent, "\(context)")
        #expect(report.accountingConsistent, "\(context)")
        #expect(report.replicationRestored, "\(context)")
        #expect(report.workersRejoined, "\(context)")
        #expect(report.processesLeft == 0, "\(context)")
        #expect(report.passed, "\(context)")
    }

    @Test func badScenariosAreRefusedWithTheField() throws {
        let cases: [(String, String)] = [
            ("name: x\nfaults: []", "faults must be a non-empty list"),
            ("name: x\nworkerFaults: 7", "workerFaults must be a string"),
            ("name: x\nworkers: 2\nreplication: 3\nfaults: [{beforeStep: 1, action: kill}]", "replication (3)"),
            ("name: x\nfaults: [{beforeStep: 1, action: explode}]", "faults[0].action 'explode'"),
            ("name: x\nfaults: [{beforeStep: 99, action: kill}]", "faults[0].beforeStep"),
            ("name: x\nfaults: [{beforeStep: 1, action: kill, target: leader}]", "faults[0].target 'leader'"),
            ("name: x\nwokers: 3\nfaults: [{beforeStep: 1, action: kill}]", "unknown key 'wokers'"),
            ("name: x\npolicy: lru\nfaults: [{beforeStep: 1, action: kill}]", "lru"),
            ("name: x\nfaults: [{beforeStep: 1, action: kill, target: coordinator}]", "can only be restarted, paused"),
            (
                "name: x\nfaults: [{beforeStep: 1, action: kill, afterMillis: -5}]",
                "faults[0].afterMillis must be an integer"
            ),
        ]
        for (yaml, expected) in cases {
            do {
                _ = try ChaosScenario.parse(yaml: yaml, source: "test.yaml")
                Issue.record("accepted: \(yaml)")
            } catch {
                #expect(error.description.contains(expected), "\(yaml): \(error)")
                #expect(error.description.hasPrefix("test.yaml"), "\(error)")
            }
        }
    }
}

import Chaos
import ClusterLauncher
import FoundationEssentials
import Logging
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

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
        // The processes log at info to files, kept and quoted (their last lines) only if the run fails.
        let logs = try temporaryDirectory("tessera-chaos-\(name)")
        let report = try await ChaosRunner.run(
            scenario,
            binary: LocalCluster.siblingBinary,
            logger: Self.logger,
            childLogLevel: "info",
            logDirectory: FilePath(logs)
        )
        let evidence = report.passed ? "" : "\nlogs in \(logs):\n\(lastLines(ofFilesIn: logs, count: 30))"
        if report.passed { try? FileManager.default.removeItem(atPath: logs) }
        let context = "\(name), seed \(scenario.seed): \(report)\(evidence)"
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

/// A new empty folder under /tmp whose name starts with `prefix`.
func temporaryDirectory(_ prefix: String) throws -> String {
    var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
    guard let path = mkdtemp(&template) else { throw ChaosError("cannot create a temporary folder for \(prefix)") }
    return String(cString: path)
}

/// The last `count` lines of every file in `directory`, each under its name.
func lastLines(ofFilesIn directory: String, count: Int) -> String {
    let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted()
    return names.map { name in
        let text = FileManager.default.contents(atPath: "\(directory)/\(name)").map {
            String(decoding: $0, as: UTF8.self)
        }
        let lines = (text ?? "(unreadable)").split(separator: "\n", omittingEmptySubsequences: false).suffix(count)
        return "--- \(name)\n" + lines.joined(separator: "\n")
    }.joined(separator: "\n")
}

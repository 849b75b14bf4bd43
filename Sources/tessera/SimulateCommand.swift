import ArgumentParser
import ClusterTransport
import FoundationEssentials
import Logging
import Simulation

#if canImport(Glibc)
    import Glibc
#endif

struct SimulateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate",
        abstract: "Run the cluster's real code under seeded faults in one thread on a simulated clock, checking invariants.",
        discussion: """
            Each seed is one schedule: the coordinator, the workers and the clients (the same services \
            and client library the processes run) as tasks on one thread, connected by a simulated \
            network that delays every frame, and hit by crashes and restarts of workers and of the \
            coordinator and by partitions between any two nodes, while the clients open, prefill, \
            decode and close sequences of the tiny model with real compression. Checked as replies \
            arrive and at the end: every acknowledged decode step equals the fault-free output bit for \
            bit; at most one copy of a shard acknowledges writes in an epoch; no worker accepts an \
            assignment older than one it accepted; the coordinator's accounting stays within its \
            memory limit; once the faults stop, every sequence closes and nothing stays accounted or \
            held. A failing seed prints its trace; `--seed S` replays it exactly.

              tessera simulate --seeds 200
              tessera simulate --seed 17 --trace
            """
    )

    @Option(help: "Run this many schedules, seeds --first ..< --first + N.")
    var seeds = 100

    @Option(help: "The first seed of --seeds.")
    var first: UInt64 = 1

    @Option(help: "Run only this seed (and print its trace with --trace).")
    var seed: UInt64?

    @Option(help: "Workers in the cluster (replication 2).")
    var workers = 3

    @Option(help: "The coordinator's memory limit in bytes (small, so that admission refuses and clients wait).")
    var memoryLimitBytes: UInt64 = SimulationSettings().memoryLimitBytes

    @Option(
        help: ArgumentHelp(
            "Switch off one protection in every node, to see the invariants catch its absence: \(Protection.allCases.map(\.weakness).joined(separator: ", ")).",
            valueName: "name"
        )
    )
    var weaken: String?

    @Flag(help: "Print every schedule's trace, not only failing ones.")
    var trace = false

    @Option(help: "Put the nodes' own log lines at this level and above into the trace: trace, debug, info, notice, warning, error.")
    var logLevel: String?

    func validate() throws {
        guard seeds > 0 else { throw ValidationError("--seeds must be at least 1, got \(seeds)") }
        guard (2...16).contains(workers) else { throw ValidationError("--workers must be in 2...16, got \(workers)") }
        if let weaken, !Protection.allCases.contains(where: { $0.weakness == weaken }) {
            throw ValidationError(
                "unknown --weaken '\(weaken)'; allowed: \(Protection.allCases.map(\.weakness).joined(separator: ", "))"
            )
        }
        if let logLevel, Logger.Level(rawValue: logLevel) == nil {
            throw ValidationError(
                "unknown --log-level '\(logLevel)'; allowed: \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))"
            )
        }
    }

    func run() throws {
        Self.hashDeterministically()
        var settings = SimulationSettings()
        settings.workers = workers
        settings.memoryLimitBytes = memoryLimitBytes
        settings.logLevel = logLevel.flatMap(Logger.Level.init(rawValue:))
        settings.weakened = Set(Protection.allCases.filter { $0.weakness == weaken })
        let chosen = seed.map { [$0] } ?? Array(first..<(first + UInt64(seeds)))
        let started = ContinuousClock.now
        var failures: [SimulationReport] = []
        var totals = (completed: 0, failed: 0, faults: 0, jobs: 0, simulated: Duration.zero)
        for (index, seed) in chosen.enumerated() {
            let report = Simulation.run(seed: seed, settings: settings)
            totals.completed += report.sequencesCompleted
            totals.failed += report.sequencesFailed
            totals.faults += report.faults
            totals.jobs += report.jobs
            totals.simulated += report.simulatedTime
            if trace || !report.passed {
                print("seed \(seed): \(report.passed ? "passed" : "FAILED")")
                for line in report.trace { print("  \(line)") }
            }
            if !report.passed { failures.append(report) }
            if chosen.count > 1, (index + 1) % 50 == 0 {
                Terminal.error("[tessera] \(index + 1)/\(chosen.count) schedules, \(failures.count) failed\n")
            }
        }
        let elapsed = ContinuousClock.now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let perMinute = Double(chosen.count) / seconds * 60
        print(
            "\(chosen.count) schedules, \(failures.count) failed; \(totals.faults) faults, "
                + "\(totals.completed) sequences completed, \(totals.failed) given up; "
                + "\(Int(perMinute.rounded())) schedules per minute on one core"
        )
        if !failures.isEmpty {
            print("failing seeds: \(failures.map { String($0.seed) }.joined(separator: " ")) (replay: tessera simulate --seed S --trace)")
            throw ExitCode(1)
        }
    }

    /// Swift seeds its hash functions per process, which changes the order of dictionary walks and
    /// so the schedule: the command runs itself again with the fixed seed, so a seed replays exactly.
    private static func hashDeterministically() {
        guard getenv("SWIFT_DETERMINISTIC_HASHING") == nil else { return }
        setenv("SWIFT_DETERMINISTIC_HASHING", "1", 1)
        let arguments = CommandLine.arguments.map { strdup($0) } + [nil]
        execv("/proc/self/exe", arguments)
        // Not reached unless exec failed; the run goes on, replayable only within this process.
        Terminal.error("[tessera] could not re-run with deterministic hashing; seeds replay only in this process\n")
    }
}

import ArgumentParser
import ClusterTransport
import Dispatch
import Logging
import Simulation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

struct SimulateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate",
        abstract:
            "Run the cluster's real code under seeded faults in one thread on a simulated clock, checking invariants.",
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

    @Option(
        help: ArgumentHelp(
            "The kinds of fault to inject, comma-separated, from \(FaultKind.allCases.map(\.rawValue).joined(separator: ", ")); or none.",
            valueName: "kinds"
        )
    )
    var faults = FaultKind.standard.sorted().map(\.rawValue).joined(separator: ",")

    @Flag(
        inversion: .prefixedNo,
        help:
            "Run the intruder: a client of its own tenant that replays the cluster's recent requests, a few bytes changed, to every node; none of it may succeed."
    )
    var intruder = true

    @Option(help: "Schedules run at once, each on its own thread (1 ... cores).")
    var jobs = 1

    @Flag(help: "Succeed only if some schedule fails (stops at the first): checks that --weaken is caught.")
    var expectViolation = false

    @Option(help: "Write a JSON summary (seeds, failing seeds, faults, schedules per minute) to this path.")
    var json: String?

    @Flag(help: "Print every schedule's trace, not only failing ones.")
    var trace = false

    @Option(
        help:
            "Put the nodes' own log lines at this level and above into the trace: trace, debug, info, notice, warning, error."
    )
    var logLevel: String?

    func validate() throws {
        guard seeds > 0 else { throw ValidationError("--seeds must be at least 1, got \(seeds)") }
        guard (2...16).contains(workers) else { throw ValidationError("--workers must be in 2...16, got \(workers)") }
        guard (1...256).contains(jobs) else { throw ValidationError("--jobs must be in 1...256, got \(jobs)") }
        if expectViolation && weaken == nil {
            throw ValidationError("--expect-violation needs --weaken NAME (a sound cluster must pass)")
        }
        if let weaken, !Protection.allCases.contains(where: { $0.weakness == weaken }) {
            throw ValidationError(
                "unknown --weaken '\(weaken)'; allowed: \(Protection.allCases.map(\.weakness).joined(separator: ", "))"
            )
        }
        _ = try faultKinds()
        if let logLevel, Logger.Level(rawValue: logLevel) == nil {
            throw ValidationError(
                "unknown --log-level '\(logLevel)'; allowed: \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))"
            )
        }
    }

    /// `--faults` as a set; a kind not known is refused, naming the allowed ones.
    private func faultKinds() throws -> Set<FaultKind> {
        guard faults != "none" else { return [] }
        return Set(
            try faults.split(separator: ",").map { name in
                guard let kind = FaultKind(rawValue: String(name)) else {
                    throw ValidationError(
                        "unknown fault kind '\(name)' in --faults; allowed: "
                            + FaultKind.allCases.map(\.rawValue).joined(separator: ", ") + ", or none"
                    )
                }
                return kind
            }
        )
    }

    func run() throws {
        Self.hashDeterministically()
        var settings = SimulationSettings()
        settings.workers = workers
        settings.memoryLimitBytes = memoryLimitBytes
        settings.intruder = intruder
        settings.faults = try faultKinds()
        settings.logLevel = logLevel.flatMap(Logger.Level.init(rawValue:))
        settings.weakened = Set(Protection.allCases.filter { $0.weakness == weaken })
        let chosen = seed.map { [$0] } ?? Array(first..<(first + UInt64(seeds)))
        let started = ContinuousClock.now
        let reports = Self.runAll(
            chosen,
            settings: settings,
            jobs: min(jobs, chosen.count),
            stopAtFailure: expectViolation
        )
        let elapsed = ContinuousClock.now - started
        let failures = reports.filter { !$0.passed }
        for report in reports where trace || !report.passed {
            print("seed \(report.seed): \(report.passed ? "passed" : "FAILED")")
            for line in report.trace { print("  \(line)") }
        }
        let summary = SimulationSummary(reports, elapsed: elapsed, jobs: jobs, weakened: weaken)
        print(
            "\(summary.schedules) schedules, \(summary.failingSeeds.count) failed; \(summary.faults) faults, "
                + "\(summary.sequencesCompleted) sequences completed, \(summary.sequencesGivenUp) given up; "
                + "\(summary.schedulesPerMinutePerCore) schedules per minute per core (\(jobs) job\(jobs == 1 ? "" : "s"))"
        )
        if !summary.intrusions.isEmpty {
            let outcomes = summary.intrusions.sorted { ($1.value, $0.key) < ($0.value, $1.key) }
            print(
                "intruder: \(summary.intrusions.values.reduce(0, +)) messages; "
                    + outcomes.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            )
        }
        if let json { try writeJSONReport(summary, to: json) }
        if expectViolation {
            guard let caught = failures.first else {
                print("--weaken \(weaken ?? "(none)"): no violation in \(reports.count) schedules")
                throw ExitCode(1)
            }
            print("caught at seed \(caught.seed): \(caught.violations.first ?? "")")
            return
        }
        if !failures.isEmpty {
            print(
                "failing seeds: \(summary.failingSeeds.map(String.init).joined(separator: " ")) (replay: tessera simulate --seed S --trace)"
            )
            throw ExitCode(1)
        }
    }

    /// Runs the schedules on `jobs` threads, each schedule alone on one; returns their reports in
    /// seed order (with `stopAtFailure`, those up to the first failing seed).
    private static func runAll(
        _ seeds: [UInt64],
        settings: SimulationSettings,
        jobs: Int,
        stopAtFailure: Bool
    ) -> [SimulationReport] {
        let next = Atomic(0)
        let stop = Atomic(false)
        let reports = Mutex<[SimulationReport]>([])
        DispatchQueue.concurrentPerform(iterations: jobs) { _ in
            while !stop.load(ordering: .relaxed) {
                let index = next.add(1, ordering: .relaxed).oldValue
                guard index < seeds.count else { return }
                let report = Simulation.run(seed: seeds[index], settings: settings)
                let done = reports.withLock { reports in
                    reports.append(report)
                    return reports.count
                }
                if stopAtFailure && !report.passed { stop.store(true, ordering: .relaxed) }
                if seeds.count > 1, done % 500 == 0 {
                    Terminal.error("[tessera] \(done)/\(seeds.count) schedules\n")
                }
            }
        }
        var all = reports.withLock { $0 }.sorted { $0.seed < $1.seed }
        if stopAtFailure, let first = all.firstIndex(where: { !$0.passed }) { all = Array(all[...first]) }
        return all
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

/// What `tessera simulate --json` writes.
struct SimulationSummary: Codable {
    var schedules: Int
    var failingSeeds: [UInt64]
    var faults: Int
    var sequencesCompleted: Int
    var sequencesGivenUp: Int
    var simulatedSeconds: Double
    var wallSeconds: Double
    var jobs: Int
    var schedulesPerMinutePerCore: Int
    var weakened: String?
    /// The intruder's messages, summed over the schedules, by how they ended.
    var intrusions: [String: Int]

    init(_ reports: [SimulationReport], elapsed: Duration, jobs: Int, weakened: String?) {
        schedules = reports.count
        failingSeeds = reports.filter { !$0.passed }.map(\.seed)
        faults = reports.reduce(0) { $0 + $1.faults }
        sequencesCompleted = reports.reduce(0) { $0 + $1.sequencesCompleted }
        sequencesGivenUp = reports.reduce(0) { $0 + $1.sequencesFailed }
        simulatedSeconds = reports.reduce(0) { $0 + $1.simulatedTime.seconds }
        wallSeconds = elapsed.seconds
        self.jobs = jobs
        schedulesPerMinutePerCore =
            wallSeconds > 0 ? Int((Double(schedules) / wallSeconds * 60 / Double(jobs)).rounded()) : 0
        self.weakened = weakened
        intrusions = reports.reduce(into: [:]) { sum, report in sum.merge(report.intrusions, uniquingKeysWith: +) }
    }
}

extension Duration {
    fileprivate var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

import ArgumentParser
import Client
import ClusterLauncher
import ClusterSecurity
import ClusterTransport
import ClusterWire
import FoundationEssentials
import KVCacheCore
import LoadGenerator
import Logging
import Workloads

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Load-test a cluster with multimodal traffic and compare policies' footprint, fidelity and latency.",
        discussion: """
            Runs the same seeded traffic once per policy against a running cluster (--coordinator) or a \
            local one it starts and stops (--local N, the default with 3 workers). Each sequence is opened \
            through the coordinator, prefilled from the workload's seed on every shard, decoded step by \
            step and closed. A fraction of the sequences is audited: the workers keep their full cache \
            too and score every decode step against it (output error, needle accuracy); audited steps \
            are left out of the latency figures because they decode twice.

            Prints a live progress line on stderr and a table per policy on stdout; --json, --csv \
            (footprint every 250 ms per worker) and --report (one self-contained HTML file) write files.

            With --traces the sequences replay trace files instead: the client sends each file's \
            prefill tensors inline and its decode steps, so a model's own caches (recorded with \
            `python -m tessera.dump_hf`) load the cluster.

            Examples:
              tessera bench --local 3 --workload mixed --policies full,vl-cache --budget 0.1 --duration 20s
              tessera bench --coordinator 127.0.0.1:7400 --workload cluster/workloads/video-heavy.yaml
              tessera bench --local 2 --traces traces --policies snapkv,look-m --budget 0.2 --sequences 8
            """
    )

    @OptionGroup var options: BenchOptions

    func run() async throws {
        let plan = try options.plan()
        let outcome = try await options.tracing.exporting(service: "tessera-bench", instance: "bench") {
            try await options.execute(plan)
        }
        Terminal.output(BenchTable.render(outcome.report))
        try options.write(outcome)
    }
}

/// The options of `bench` (and, with fixed values, `demo`).
struct BenchOptions: ParsableArguments {
    @Option(help: "Coordinator of a running cluster, host:port.")
    var coordinator: String?

    @Option(help: "Start a local cluster of this many workers for the run (default 3 when --coordinator is absent).")
    var local: Int?

    @Option(help: "A workload preset (image-qa, multi-image, video, document, mixed) or a workload file (YAML).")
    var workload = "mixed"

    @Option(
        help:
            "Model geometry for a preset workload (a file names its own): llava-1.5-7b, llava-1.6-mistral-7b, qwen2.5-vl-7b or tiny."
    )
    var model = "llava-1.6-mistral-7b"

    @Option(
        help: ArgumentHelp(
            "Replay trace files instead of generated traffic (a .safetensors file, or every one in a folder; from "
                + "`tessera trace export` or `python -m tessera.dump_hf`): sequence i is file i mod N, prefilled with "
                + "its tensors sent inline (in parts of up to 16 MiB of whole layers, as float16 when the file stores "
                + "F16; one layer must fit the 64 MiB frame limit) and decoded with its steps. --workload, --model and --decode-tokens are then not used.",
            valueName: "path"
        )
    )
    var traces: String?

    @Option(help: "One policy: \(CompressionPolicy.allNames.joined(separator: ", ")).")
    var policy: String?

    @Option(help: "Comma-separated policies, each run over the same seeded traffic.")
    var policies: String?

    @Option(name: .customLong("policy-option"), help: PolicyOptions.help)
    var policyOptions: [String] = []

    @Option(help: "Retention ratio of the prompt cache, in (0, 1].")
    var budget = 0.1

    @Option(help: "Closed loop: sequences in flight (default: the workload's arrival, else 4).")
    var concurrency: Int?

    @Option(help: "Open loop: Poisson arrivals per second.")
    var rate: Double?

    @Option(help: "Open loop: at most this many sequences in flight; later arrivals wait (and their wait counts).")
    var maxInFlight = 64

    @Option(help: "How long each policy's run starts sequences for (those in flight then finish): 30, 30s, 2m, 1h.")
    var duration: DurationArgument?

    @Option(help: "Sequences per policy instead of a duration.")
    var sequences: Int?

    @Option(help: "Decode tokens per sequence (default: the workload's).")
    var decodeTokens: Int?

    @Option(help: "Fraction of sequences audited against the full cache, 0...1.")
    var auditFraction = 0.25

    @Option(help: "Seed of the traffic.")
    var seed: UInt64 = 1

    @Option(help: "With --local: workers' storage type, f32 or f16.")
    var dtype = "f32"

    @Option(
        help:
            "With --local: copies of each shard (primary and replicas) on distinct workers; 1 measures compression alone, as replicas repeat every prefill and append every decode step."
    )
    var replication = 1

    @Option(help: "With --local: the coordinator's cluster-wide limit on accounted KV bytes (0 = none).")
    var memoryLimitBytes: UInt64 = 0

    @Option(help: "With --local: tightening under memory pressure stops at this retention ratio.")
    var floorRatio = 0.02

    @Option(help: "Write the results as JSON to this path.")
    var json: String?

    @Option(help: "Write the footprint time series (every 250 ms, per worker) as CSV to this path.")
    var csv: String?

    @Option(help: "Write a self-contained HTML report (charts and tables) to this path.")
    var report: String?

    @Option(help: "Log level of the cluster's processes with --local.")
    var logLevel = "error"

    @OptionGroup(title: "Hosts (with --local)") var hosts: HostOptions

    @OptionGroup(title: "Tracing (each sequence one trace, with --local the cluster's spans too)")
    var tracing: TracingOptions

    @OptionGroup(title: "Security (with --coordinator; --local makes a throw-away CA unless --insecure)")
    var security: ClientSecurityOptions

    /// The plan these options describe, or a usage failure naming what is allowed.
    func plan() throws(ExitCode) -> BenchPlan {
        var file: WorkloadFile
        let isFile = workload.hasSuffix(".yaml") || workload.hasSuffix(".yml") || workload.contains("/")
        do {
            if isFile {
                file = try WorkloadFile.load(path: workload)
            } else {
                file = WorkloadFile(
                    preset: try WorkloadPreset.named(workload),
                    geometry: try ModelGeometry.preset(named: model)
                )
            }
        } catch let error as WorkloadError {
            throw usageFailure("--workload: \(error.message)")
        } catch {
            throw usageFailure("--model: \(error)")
        }
        if let decodeTokens {
            guard (1...4096).contains(decodeTokens) else {
                throw usageFailure("--decode-tokens must be in 1...4096, got \(decodeTokens)")
            }
            file.traceSettings.decodeSteps = decodeTokens
        }
        guard policy == nil || policies == nil else { throw usageFailure("give --policy or --policies, not both") }
        let names = (policies ?? policy ?? "vl-cache").split(separator: ",").map { String($0).trimmed }
        guard budget > 0, budget <= 1 else { throw usageFailure("--budget must be in (0, 1], got \(budget)") }
        var named: [CompressionPolicy] = []
        for name in names {
            do {
                named.append(try CompressionPolicy.named(name))
            } catch {
                throw usageFailure("--policies: \(error.message)")
            }
        }
        let chosen = try PolicyOptions.apply(policyOptions, to: named).map { policy in
            BenchPlan.Policy(name: policy.label, policy: policy, retention: policy == .full ? 1 : budget)
        }
        guard !chosen.isEmpty else { throw usageFailure("--policies needs at least one policy") }
        let loop: BenchPlan.Loop
        switch (concurrency, rate) {
        case (.some, .some): throw usageFailure("give --concurrency (closed loop) or --rate (open loop), not both")
        case (.some(let n), nil):
            guard (1...1024).contains(n) else { throw usageFailure("--concurrency must be in 1...1024, got \(n)") }
            loop = .closed(concurrency: n)
        case (nil, .some(let r)):
            guard r > 0, r <= 10_000 else { throw usageFailure("--rate must be in (0, 10000], got \(r)") }
            loop = .open(ratePerSecond: r, maxInFlight: maxInFlight)
        case (nil, nil):
            switch file.arrival {
            case .closed(let n): loop = .closed(concurrency: n)
            case .poisson(let r): loop = .open(ratePerSecond: r, maxInFlight: maxInFlight)
            }
        }
        guard (1...4096).contains(maxInFlight) else {
            throw usageFailure("--max-in-flight must be in 1...4096, got \(maxInFlight)")
        }
        let stop: BenchPlan.Stop
        switch (duration, sequences) {
        case (.some, .some): throw usageFailure("give --duration or --sequences, not both")
        case (.some(let duration), nil):
            let seconds = duration.seconds
            guard seconds > 0, seconds <= 86_400 else {
                throw usageFailure("--duration must be in (0, 86400] seconds, got \(seconds)")
            }
            stop = .after(.seconds(seconds))
        case (nil, .some(let n)):
            guard (1...1_000_000).contains(n) else {
                throw usageFailure("--sequences must be in 1...1000000, got \(n)")
            }
            stop = .sequences(n)
        case (nil, nil): stop = .after(.seconds(20))
        }
        guard (0...1).contains(auditFraction) else {
            throw usageFailure("--audit-fraction must be in 0...1, got \(auditFraction)")
        }
        guard ScalarType(rawValue: dtype) != nil else {
            throw usageFailure("unknown --dtype '\(dtype)'; allowed: f32, f16")
        }
        guard (0...1).contains(floorRatio) else {
            throw usageFailure("--floor-ratio must be in 0...1, got \(floorRatio)")
        }
        var plan = BenchPlan(
            workloadName: isFile ? file.name : workload,
            workload: file,
            policies: chosen,
            loop: loop,
            stop: stop,
            seed: seed,
            auditFraction: auditFraction
        )
        if let traces {
            guard decodeTokens == nil else {
                throw usageFailure("--decode-tokens does not apply to --traces: each file has its own decode steps")
            }
            plan.traces = try TraceFile.all(at: traces)
            plan.workloadName = traces
        }
        return plan
    }

    /// Runs the plan against the given coordinator, or a local cluster started and stopped around it.
    func execute(_ plan: BenchPlan) async throws -> (report: BenchReport, samples: [FootprintSample]) {
        let logger = Logger(label: "tessera.bench")
        let line = ProgressLine()
        defer { line.finish() }
        let progress: @Sendable (BenchProgress) -> Void = { p in
            line.draw(
                "\(p.policy)  \(p.elapsed.components.seconds) s  sequences \(p.sequencesDone) (\(p.live) live)  "
                    + "\(ResultTable.format(p.tokensPerSecond, 1)) tok/s  KV \(ResultTable.bytes(Int(p.kvBytes)))  "
                    + "errors \(p.errors)  refusals \(p.refusals)"
            )
        }
        if let coordinator {
            guard local == nil else { throw usageFailure("give --coordinator or --local, not both") }
            guard hosts.hosts == nil else {
                throw usageFailure("--hosts starts a cluster on hosts; give it with --local")
            }
            let address: NodeAddress
            do { address = try NodeAddress(parsing: coordinator) } catch {
                throw usageFailure("--coordinator: \(error.message)")
            }
            let transport = try security.security()
            let client = try await workerCount(address, security: transport, logger: logger)
            return try await LoadRunner.run(
                plan,
                coordinator: address,
                security: transport,
                workers: client,
                logger: logger,
                progress: progress
            )
        }
        let workers = local ?? 3
        guard (1...64).contains(workers) else { throw usageFailure("--local must be in 1...64, got \(workers)") }
        var launch = LocalCluster.Options(
            binary: LocalCluster.currentBinary,
            workers: workers,
            childArguments: ["--log-level", logLevel] + tracing.childArguments
        )
        launch.coordinatorArguments = [
            "--memory-limit-bytes", "\(memoryLimitBytes)", "--floor-ratio", "\(floorRatio)", "--replication",
            "\(replication)",
        ]
        launch.workerArguments = ["--storage", dtype]
        if security.transport.insecure { launch.security = .insecure }
        let topology = try await hosts.topology()
        Terminal.error(
            "[tessera] starting a local cluster: coordinator + \(workers) workers"
                + (topology.map { " on \($0.hosts) hosts, links \($0.link)" } ?? "") + "\n"
        )
        let options = launch
        return try await hosts.run(on: topology, logger: logger) { running in
            var options = options
            options.hosts = running
            return try await LocalCluster.withCluster(options, logger: logger) { cluster in
                try await LoadRunner.run(
                    plan,
                    coordinator: cluster.coordinator,
                    security: try cluster.clientSecurity(name: "bench", tenant: "bench"),
                    workers: cluster.workers.count,
                    logger: logger,
                    progress: progress
                )
            }
        }
    }

    private func workerCount(_ address: NodeAddress, security: TransportSecurity, logger: Logger) async throws -> Int {
        try await TesseraClient.withClient(coordinator: address, security: security, logger: logger) { client in
            try await client.status().workers.filter { $0.state == "alive" }.count
        }
    }

    /// Writes the files asked for and names them on stderr.
    func write(_ outcome: (report: BenchReport, samples: [FootprintSample])) throws {
        func save(_ text: String, _ path: String?, _ what: String) throws {
            guard let path else { return }
            do {
                try text.write(toFile: path, atomically: true, encoding: .utf8)
            } catch {
                throw ValidationError("cannot write the \(what) to \(path): \(error)")
            }
            Terminal.error("[tessera] \(what) written to \(path)\n")
        }
        try save(try JSONWriter.render(outcome.report), json, "JSON results")
        try save(CSVWriter.render(outcome.samples), csv, "footprint CSV")
        try save(HTMLReport.render(outcome.report, samples: outcome.samples), report, "HTML report")
    }
}

/// The per-policy table printed at the end of a run.
enum BenchTable {
    static func render(_ report: BenchReport) -> String {
        let header = [
            "policy", "budget", "seqs", "tok/s", "p50 ms", "p99 ms", "max ms", "ttft p50 ms", "peak KV",
            "mean KV", "saving %", "head rows %", "out err", "needle", "errors", "refusals",
        ]
        let rows = report.policies.map { r in
            [
                r.policy, ResultTable.format(r.budget, 2), "\(r.sequences)", ResultTable.format(r.tokensPerSecond, 1),
                millis(r.decodeP50Micros), millis(r.decodeP99Micros), millis(r.decodeMaxMicros),
                millis(r.prefillP50Micros),
                ResultTable.bytes(Int(r.peakKVBytes)), ResultTable.bytes(Int(r.meanKVBytes)),
                ResultTable.format(100 * r.saving, 1), r.headRowShares.map(ResultTable.percentages) ?? "-",
                r.outputError.map { ResultTable.format($0, 4) } ?? "-",
                r.needleAccuracy.map { ResultTable.format($0, 3) } ?? "-", "\(r.errors)", "\(r.refusals)",
            ]
        }
        let title =
            "\(report.workload) on \(report.model), \(report.workers) workers, \(report.loop) loop "
            + "(\(report.loop == "closed" ? "concurrency" : "rate") \(ResultTable.format(report.load, report.loop == "closed" ? 0 : 2))), seed \(report.seed)\n"
        var out = title + ResultTable.table(header: header, rows: rows)
        // What each method costs at prefill apart from what it saves at decode, per completed sequence.
        let costHeader = ["policy", "decode tok/s/seq", "synthesis ms", "profile ms", "compress ms", "KV GiB·s"]
        let costRows = report.policies.map { r in
            [
                r.policy, ResultTable.format(r.decodeThroughput, 1), ResultTable.format(r.synthesisMillis, 1),
                ResultTable.format(r.profileMillis, 1), ResultTable.format(r.compressMillis, 1),
                ResultTable.format(r.kvByteSeconds / Double(1 << 30), 2),
            ]
        }
        out +=
            "\nper sequence: decode tokens per second of decode time; workers' prefill compute; K/V bytes × seconds\n"
        out += ResultTable.table(header: costHeader, rows: costRows)
        for result in report.policies where !result.errorMessages.isEmpty {
            out += "\(result.policy) errors: " + result.errorMessages.joined(separator: "; ") + "\n"
        }
        return out
    }

    static func millis(_ micros: UInt64) -> String { ResultTable.format(Double(micros) / 1000, 2) }
}

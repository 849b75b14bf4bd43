import ArgumentParser

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a local cluster and compare the full cache, VL-Cache, MadaKV and LOOK-M at 10% on mixed traffic.",
        discussion: """
            Starts a coordinator and 3 workers as processes, runs about a minute of `mixed` multimodal
            traffic (single-image QA, multi-image, video and long-document prompts) once per policy, prints
            the comparison table and writes an HTML report, then stops every process. The same as:
              tessera bench --local 3 --workload mixed --policies full,vl-cache,madakv,look-m \\
                --budget 0.1 --duration 12 --report tessera-demo.html
            For the per-layer, in-process comparison of all eight policies, see `tessera eval`.
            """
    )

    @Option(help: "Model geometry: llava-1.5-7b, llava-1.6-mistral-7b, qwen2.5-vl-7b or tiny.")
    var model = "llava-1.6-mistral-7b"

    @Option(help: "Seconds each policy's run starts sequences for.")
    var duration = 12.0

    @Option(help: "Where to write the HTML report.")
    var report = "tessera-demo.html"

    @Option(help: "Seed of the traffic.")
    var seed: UInt64 = 1

    func run() async throws {
        let options = try BenchOptions.parse([
            "--local", "3", "--workload", "mixed", "--model", model, "--policies", "full,vl-cache,madakv,look-m",
            "--budget", "0.1", "--duration", "\(duration)", "--report", report, "--seed", "\(seed)",
        ])
        let plan = try options.plan()
        let outcome = try await options.execute(plan)
        Terminal.output(BenchTable.render(outcome.report))
        try options.write(outcome)
        Terminal.output("report: \(report)\n")
    }
}

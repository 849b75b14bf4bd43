import ArgumentParser
import KVCacheCore
import LoadGenerator
import Workloads

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Start a local cluster and compare the full cache, VL-Cache, MadaKV and LOOK-M at 10% on mixed traffic.",
        discussion: """
            Starts a coordinator and 3 workers as processes, runs about a minute of `mixed` multimodal \
            traffic (single-image QA, multi-image, video and document prompts) once per policy, prints the \
            comparison table and writes an HTML report, then stops every process.

            So that a minute on a laptop covers dozens of sequences, images are pooled to 144 visual \
            tokens (as LLaVA-NeXT-Video pools frames) and documents carry 384-768 text tokens: LOOK-M \
            and VL-Cache on documents need the full prefill attention, which grows with the square of \
            the prompt. `tessera bench --workload cluster/workloads/mixed.yaml` runs full-size prompts. \
            For the in-process comparison of all eight policies, see `tessera eval`.
            """
    )

    @Option(help: "Model geometry: llava-1.5-7b, llava-1.6-mistral-7b, qwen2.5-vl-7b or tiny.")
    var model = "llava-1.6-mistral-7b"

    @Option(help: "How long each policy's run starts sequences for: 12, 12s, 1m.")
    var duration = DurationArgument(seconds: 12)

    @Option(help: "Where to write the HTML report.")
    var report = "tessera-demo.html"

    @Option(help: "Seed of the traffic.")
    var seed: UInt64 = 1

    @Option(help: "Also write the results as JSON to this path.")
    var json: String?

    func run() async throws {
        let options = try BenchOptions.parse(
            [
                "--local", "3", "--workload", "mixed", "--model", model, "--policies", "full,vl-cache,madakv,look-m",
                "--budget", "0.1", "--duration", "\(duration)", "--report", report, "--seed", "\(seed)",
            ] + (json.map { ["--json", $0] } ?? [])
        )
        var plan = try options.plan()
        plan.workload.geometry.tokensPerImage = 144
        plan.workload.traceSettings.documentTextTokens = 384...768
        let outcome = try await options.execute(plan)
        Terminal.output(BenchTable.render(outcome.report))
        try options.write(outcome)
        Terminal.output("report: \(report)\n")
    }
}

import ArgumentParser
import Evaluation
import KVCacheCore
import Workloads

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare every policy at a 10% budget on the mixed multimodal workload.",
        discussion: """
            Draws a few sequences from the `mixed` workload (single-image QA, multi-image, video and
            long-document prompts) on the LLaVA-1.5-7B geometry, compresses their KV cache with every
            policy at 10% retention and prints kept bytes, decode-attention error, needle accuracy, hit
            rate and compress time. The same as:
              tessera eval --workload mixed --budgets 0.1 --sequences 4
            """
    )

    @Option(help: "Model geometry: llava-1.5-7b, llava-1.6-mistral-7b, qwen2.5-vl-7b or tiny.")
    var model = "llava-1.5-7b"

    @Option(help: "Number of sequences drawn from the workload.")
    var sequences = 4

    @Option(help: "Seed of the synthetic traces.")
    var seed: UInt64 = 1

    func run() async throws {
        let options = try EvaluationOptions.parse([
            "--workload", "mixed", "--model", model, "--budgets", "0.1", "--sequences", "\(sequences)",
            "--seed", "\(seed)",
        ])
        let request = try options.request()
        Terminal.error(
            "[tessera] demo: \(request.sequences) mixed sequences on \(request.geometry.name), "
                + "\(request.policies.count) policies at 10% retention\n")
        let results = try await runWithProgress(request, parallelism: options.effectiveParallelism)
        Terminal.output(ResultTable.render(results, request: request))
    }
}

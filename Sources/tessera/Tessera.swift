import ArgumentParser

struct Tessera: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tessera",
        abstract: "Modality-aware KV-cache compression for vision-language models.",
        discussion: """
            Tessera compresses the KV cache of VLM inference with modality-aware methods (VL-Cache, MadaKV, \
            LOOK-M) and their baselines, and measures what each saves and what it costs in fidelity. \
            Start with `tessera demo`; `tessera eval --help` lists the evaluation options.
            """,
        subcommands: [
            Demo.self, Eval.self, BenchKernels.self, ClusterCommand.self, CoordinatorCommand.self, WorkerCommand.self,
            StatusCommand.self, Bench.self, ChaosCommand.self, BenchWire.self, CertsCommand.self,
            SimulateCommand.self, TraceCommand.self, Compress.self,
        ]
    )
}

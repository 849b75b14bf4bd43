import ArgumentParser
import Evaluation
import KVCacheCore
import NIOCore
import Workloads

struct BenchKernels: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-kernels",
        abstract: "Measure decode attention and the prefill profile against this machine's limits, and compress time.",
        discussion: """
            Run in release (swift run -c release tessera bench-kernels). On one core it measures the read \
            bandwidth of a SIMD sum over 1 GiB, then decode attention of one query over 32k-token heads \
            (1 GiB of K/V in all, so every pass streams from memory) in Float32 and Float16, and prints \
            e.g. `decode f32: 35.1 GB/s, 84% of read bandwidth`, and the digest replicas compare the same \
            way. On every core it then measures the FMA \
            peak (a register-only loop) and the attention profile of every row of a multi-image layer, \
            and prints e.g. `profile f32: 157 GFLOP/s, 67% of FMA peak`; then the time one thread takes \
            to synthesise that layer as a worker does for a load test. Last it times each policy \
            compressing one layer of an image-qa prompt on the chosen model at the chosen budget.
            """
    )

    @Option(help: "Model geometry for the compress-time table.")
    var model = "llava-1.5-7b"

    @Option(help: "Retention ratio for the compress-time table, in (0, 1].")
    var budget = 0.1

    @Option(help: "Seed of the synthetic layer.")
    var seed: UInt64 = 1

    func run() async throws {
        let geometry: ModelGeometry
        do { geometry = try ModelGeometry.preset(named: model) } catch { throw usageFailure(error.message) }
        guard budget > 0, budget <= 1 else { throw usageFailure("--budget must be in (0, 1], got \(budget)") }

        Terminal.error("[tessera] measuring read bandwidth (1 GiB, best of 5)…\n")
        let read = KernelBenchmark.readBandwidth()
        Terminal.output("read bandwidth: \(ResultTable.format(read, 1)) GB/s (one core, SIMD sum over 1 GiB)\n")
        // One query per KV head, then a GQA group of four (Mistral's and Llama 3's 32 query heads
        // over 8 KV heads), which reads each row once for all four.
        for groups in [1, KernelBenchmark.gqaGroup] {
            for scalar in ScalarType.allCases {
                let rate =
                    switch scalar {
                    case .float32: KernelBenchmark.decodeThroughput(Float.self, groups: groups)
                    case .float16: KernelBenchmark.decodeThroughput(Float16.self, groups: groups)
                    }
                Terminal.output(
                    "decode \(scalar.rawValue)\(groups > 1 ? ", \(groups) queries per KV head" : ""): "
                        + "\(ResultTable.format(rate, 1)) GB/s, \(Int((100 * rate / read).rounded()))% of read bandwidth\n"
                )
            }
        }

        let digest = KernelBenchmark.digestThroughput()
        Terminal.output(
            "replica digest: \(ResultTable.format(digest, 1)) GB/s, "
                + "\(Int((100 * digest / read).rounded()))% of read bandwidth (what a shard copy checks, on both sides)\n"
        )

        let threads = System.coreCount
        Terminal.error("[tessera] measuring the FMA peak and the attention profile on \(threads) threads…\n")
        let peak = KernelBenchmark.fmaPeak(threads: threads)
        let long = TraceGenerator(preset: .multiImage, geometry: geometry, seed: seed).sequence(0)
        let prefill = long.prefill(layer: geometry.layers / 2)
        let profile = try KernelBenchmark.profileThroughput(prefill: prefill, threads: threads)
        Terminal.output(
            "profile f32: \(ResultTable.format(profile.flopsPerSecond / 1e9, 1)) GFLOP/s, "
                + "\(Int((100 * profile.flopsPerSecond / peak).rounded()))% of FMA peak "
                + "(\(ResultTable.format(peak / 1e9, 1)) GFLOP/s on \(threads) threads, \(Kernels.computePath)); "
                + "every row of a multi-image layer, \(prefill.promptLength) tokens, in "
                + "\(ResultTable.format(profile.seconds * 1000, 1)) ms\n"
        )

        // What a worker spends creating the load before its cache sees a byte: the load generator's
        // cost, reported apart from the cache's.
        let window = 32
        let synthesis = KernelBenchmark.synthesisTime(
            trace: long,
            layer: geometry.layers / 2,
            firstQueryRow: long.promptLength - window
        )
        Terminal.output(
            "synthesis: one multi-image layer (keys, values, the last \(window) query rows, \(long.decodeSteps) "
                + "decode steps) in \(ResultTable.format(synthesis.seconds * 1000, 1)) ms on one thread, "
                + "\(ResultTable.format(Double(synthesis.floats) / synthesis.seconds / 1e6, 0)) M floats/s\n"
        )

        let trace = TraceGenerator(preset: .imageQA, geometry: geometry, seed: seed).sequence(0)
        let timings = try CompressTiming.measure(trace: trace, layer: geometry.layers / 2, retention: budget)
        Terminal.output(
            "compress one layer (\(geometry.name), image-qa, \(trace.layout.promptLength) tokens, "
                + "budget \(budget)):\n"
        )
        for t in timings {
            Terminal.output(
                "  \(t.policy.padding(14)) profile \(ResultTable.format(t.profileMillis, 2)) ms, select+merge "
                    + "\(ResultTable.format(t.compressMillis, 2)) ms\n"
            )
        }
    }
}

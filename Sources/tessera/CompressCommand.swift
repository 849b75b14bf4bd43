import ArgumentParser
import Evaluation
import KVCacheCore
import Workloads

struct Compress: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one policy's whole pipeline on one trace file and write the rows it keeps.",
        discussion: """
            Profiles every layer, splits the budget over layers from the statistics (as the coordinator \
            does), selects and merges, then writes per layer L and KV head H: layers.L.heads.H.kept (int32, \
            the kept positions, ascending) and layers.L.heads.H.keys / .values (float32, [rows, head_dim]; \
            merged rows for look-m). What each policy keeps is defined in docs/ARCHITECTURE.md (Kept \
            positions), so another implementation fed the same tensors can compare. \
            Example: tessera compress --trace traces/sequence-0.safetensors --policy snapkv --budget 0.2 --out kept.safetensors
            """
    )

    @Option(help: "The trace file (safetensors, as `tessera trace export` writes it).")
    var trace: String

    @Option(help: "Policy: \(CompressionPolicy.allNames.joined(separator: ", ")).")
    var policy: String

    @Option(help: "Retention ratio, in (0, 1].")
    var budget: Double

    @Option(help: "Where to write the kept rows (safetensors).")
    var out: String

    func run() async throws {
        let chosen: CompressionPolicy
        do { chosen = try CompressionPolicy.named(policy) } catch { throw usageFailure(error.message) }
        guard budget > 0, budget <= 1 else { throw usageFailure("--budget must be in (0, 1], got \(budget)") }
        let file = try TraceFile.all(at: trace)
        guard file.count == 1 else { throw usageFailure("--trace takes one file; \(trace) holds \(file.count)") }
        let result: TraceCompressor.Compressed
        do {
            result = try TraceCompressor.compress(
                file[0],
                policy: chosen,
                retention: budget,
                threads: Terminal.onlineProcessors
            )
        } catch let error as TraceFileError {
            throw usageFailure(error.message)
        } catch let error as KVCacheError {
            throw usageFailure(error.message)
        }
        try result.write(to: out, geometry: file[0].geometry, policy: policy, retention: budget)
        let kept = result.layers.joined().reduce(0) { $0 + $1.count }
        let full = file[0].geometry.layers * file[0].geometry.kvHeads * file[0].layout.promptLength
        Terminal.output(
            "\(out): \(policy) at \(budget) kept \(kept) of \(full) rows (\(ResultTable.format(100 * Double(kept) / Double(full), 1))%), "
                + "\(result.mergedRows) merged; profile \(ResultTable.format(result.profileSeconds * 1000, 1)) ms, "
                + "select+merge \(ResultTable.format(result.compressSeconds * 1000, 1)) ms\n"
        )
    }
}

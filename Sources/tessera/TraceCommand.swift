import ArgumentParser
import FoundationEssentials
import KVCacheCore
import Workloads

struct TraceCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trace",
        abstract: "Write the generator's traces as safetensors files (the format `tessera eval --traces` reads).",
        subcommands: [Export.self]
    )

    struct Export: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write generated traces to DIR/sequence-N.safetensors, one file per sequence.",
            discussion: """
                Each file holds, per layer L, layers.L.keys and layers.L.values [kv_heads, tokens, head_dim], \
                layers.L.queries [query_heads, rows, head_dim] (the last rows of the prompt), and the decode \
                steps as layers.L.decode.{keys,values,queries}; its __metadata__ carries the geometry, the \
                modality spans, the decode step count and the needle (docs/ARCHITECTURE.md, Trace files). \
                A model's own cache written the same way is evaluated just like these. \
                Example: tessera trace export --workload image-qa --model tiny --sequences 2 --out traces
                """
        )

        @Option(help: "Workload preset: image-qa, multi-image, video or document (mixed draws among them).")
        var workload = "image-qa"

        @Option(help: "Model geometry: llava-1.5-7b, llava-1.6-mistral-7b, qwen2.5-vl-7b or tiny.")
        var model = "llava-1.5-7b"

        @Option(help: "Seed of the synthetic traces.")
        var seed: UInt64 = 1

        @Option(help: "Number of sequences, one file each.")
        var sequences = 1

        @Option(help: "Tensor type in the files: f32, f16 or bf16.")
        var dtype = "f32"

        @Option(
            help: "Query rows kept per layer, the prompt's last ones (default: every row, which H2O and LOOK-M need)."
        )
        var queryRows: Int?

        @Option(help: "The folder to write into (created if missing).")
        var out: String

        func run() async throws {
            let generator: TraceGenerator
            do {
                generator = TraceGenerator(
                    preset: try WorkloadPreset.named(workload),
                    geometry: try ModelGeometry.preset(named: model),
                    seed: seed
                )
            } catch let error as KVCacheError {
                throw usageFailure(error.message)
            } catch let error as WorkloadError {
                throw usageFailure(error.message)
            }
            let types: [String: SafeTensors.DType] = ["f32": .f32, "f16": .f16, "bf16": .bf16]
            guard let type = types[dtype] else {
                throw usageFailure("unknown dtype '\(dtype)'; allowed: f32, f16, bf16")
            }
            guard (1...10_000).contains(sequences) else {
                throw usageFailure("--sequences must be in 1...10000, got \(sequences)")
            }
            if let queryRows, queryRows < 0 { throw usageFailure("--query-rows must be 0 or more, got \(queryRows)") }
            do {
                try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            } catch {
                throw usageFailure("cannot create \(out): \(error)")
            }
            for index in 0..<sequences {
                let path = "\(out)/sequence-\(index).safetensors"
                let trace = generator.sequence(index)
                try TraceFile.write(trace, queryRows: queryRows, as: type, to: path)
                Terminal.output("\(path): \(trace.preset.rawValue), \(trace.layout.promptLength) tokens\n")
            }
        }
    }
}

extension TraceFile {
    /// The traces at `path`: that file, or every `*.safetensors` in that folder, in name order.
    static func all(at path: String) throws(ExitCode) -> [TraceFile] {
        var isFolder = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isFolder) else {
            throw usageFailure("--traces: \(path) does not exist")
        }
        let paths: [String]
        if isFolder {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
            paths = names.filter { $0.hasSuffix(".safetensors") }.sorted().map { "\(path)/\($0)" }
            guard !paths.isEmpty else { throw usageFailure("--traces: \(path) holds no .safetensors file") }
        } else {
            paths = [path]
        }
        do {
            return try paths.map { file throws(TraceFileError) in try TraceFile(contentsOf: file) }
        } catch {
            throw usageFailure(error.message)
        }
    }
}

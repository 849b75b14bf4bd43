import ArgumentParser
import Evaluation
import FoundationEssentials
import KVCacheCore
import Synchronization
import Workloads

/// Options shared by `eval` and `demo`: which traces and which policies.
struct EvaluationOptions: ParsableArguments {
    @Option(help: "Workload preset: image-qa, multi-image, video, document or mixed.")
    var workload = "image-qa"

    @Option(help: "Model geometry: llava-1.5-7b, llava-1.6-mistral-7b, qwen2.5-vl-7b or tiny.")
    var model = "llava-1.5-7b"

    @Option(help: "Comma-separated policies: \(CompressionPolicy.allNames.joined(separator: ", ")).")
    var policies = CompressionPolicy.allNames.joined(separator: ",")

    @Option(help: "Comma-separated retention ratios, each in (0, 1].")
    var budgets = "0.05,0.1,0.2"

    @Option(help: "Number of sequences drawn from the workload.")
    var sequences = 2

    @Option(help: "Seed of the synthetic traces.")
    var seed: UInt64 = 1

    @Option(help: "Storage type of the cached rows: f32 or f16.")
    var dtype = "f32"

    @Option(help: "Layers processed in parallel (default: the number of cores).")
    var parallelism: Int?

    @Option(help: "Write the results as JSON to this path.")
    var json: String?

    @Option(name: .customLong("policy-option"), help: PolicyOptions.help)
    var policyOptions: [String] = []

    /// The request these options describe, or a usage failure naming what is allowed; `policyNames`
    /// replaces `--policies`.
    func request(policyNames: [String]? = nil) throws(ExitCode) -> EvaluationRequest {
        do {
            let preset = try WorkloadPreset.named(workload)
            let geometry = try ModelGeometry.preset(named: model)
            let names = policyNames ?? policies.split(separator: ",").map { String($0).trimmed }
            guard !names.isEmpty else { throw usageFailure("--policies needs at least one policy") }
            let chosen = try PolicyOptions.apply(
                policyOptions,
                to: try names.map { name throws(KVCacheError) in try CompressionPolicy.named(name) }
            )
            let ratios = try budgets.split(separator: ",").map { text throws(ExitCode) in
                guard let value = Double(String(text).trimmed), value > 0, value <= 1 else {
                    throw usageFailure("budget '\(text)' is not a number in (0, 1]; write e.g. --budgets 0.05,0.1,0.2")
                }
                return value
            }
            guard let scalar = ScalarType(rawValue: dtype) else {
                throw usageFailure("unknown dtype '\(dtype)'; allowed: f32, f16")
            }
            guard sequences >= 1, sequences <= 10_000 else {
                throw usageFailure("--sequences must be in 1...10000, got \(sequences)")
            }
            return EvaluationRequest(
                preset: preset,
                geometry: geometry,
                policies: chosen,
                budgets: ratios,
                sequences: sequences,
                seed: seed,
                scalar: scalar
            )
        } catch let error as KVCacheError {
            throw usageFailure(error.message)
        } catch let error as WorkloadError {
            throw usageFailure(error.message)
        } catch let exit as ExitCode {
            throw exit
        } catch {
            throw usageFailure("\(error)")
        }
    }

    var effectiveParallelism: Int { max(1, parallelism ?? Terminal.onlineProcessors) }
}

struct Eval: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Evaluate every policy at every budget over the same synthetic traces, in one process.",
        discussion: """
            Prints a table (policy, budget, kept bytes, % of full, head rows %, output error, needle accuracy, \
            hit rate, compress ms) on stdout; progress goes to stderr. Byte figures are per sequence. Head \
            rows % is the smallest and the largest share of the prompt's rows that any one KV head of any \
            layer keeps (equal for a uniform budget). Output error is \
            the mean relative error of decode-attention outputs against the full cache; hit rate is \
            VL-Cache's CacheHitRate against the first decode token's attention. \
            Example: tessera eval --workload multi-image --budgets 0.1,0.2 --json results.json
            """
    )

    @OptionGroup var options: EvaluationOptions

    @Flag(help: "Print the generated traces' statistics (per-layer sparsity, modality share of attention) and exit.")
    var describe = false

    @Option(
        help: ArgumentHelp(
            "Evaluate the trace files here (a .safetensors file, or every one in a folder; see `tessera trace export`) "
                + "instead of generated traces; --workload, --model, --seed and --sequences are then not used.",
            valueName: "path"
        )
    )
    var traces: String?

    @Option(
        help: ArgumentHelp(
            "Run the composite with each of its parts (layer budgets, head split, merging) on and off instead of "
                + "--policies, and print what each part contributes; --policy-option composite.KEY=VALUE sets the "
                + "rest (e.g. composite.observation=lastRows:32). The only value is composite.",
            valueName: "policy"
        )
    )
    var ablate: String?

    func run() async throws {
        var request: EvaluationRequest
        if let ablate {
            guard ablate == "composite" else {
                throw usageFailure("--ablate '\(ablate)' is not ablatable; the only value is composite")
            }
            request = try options.request(policyNames: ["composite"])
            guard case .composite(let base) = request.policies.first else { preconditionFailure("not the composite") }
            request.policies = CompositeAblation.variants(of: base)
        } else {
            request = try options.request()
        }
        if let traces {
            guard !describe else {
                throw usageFailure("--describe measures generated traces; it does not take --traces")
            }
            let files = try TraceFile.all(at: traces)
            request.geometry = files[0].geometry
            request.sequences = files.count
            request.traceFiles = files
        }
        if describe {
            let generator = TraceGenerator(
                preset: request.preset,
                geometry: request.geometry,
                settings: request.traceSettings,
                seed: request.seed
            )
            for index in 0..<request.sequences {
                let trace = generator.sequence(index)
                Terminal.output("sequence \(index) (\(trace.preset.rawValue), \(trace.layout.promptLength) tokens)\n")
                Terminal.output(WorkloadStatistics.measure(trace).description + "\n")
            }
            return
        }
        let results = try await runWithProgress(request, parallelism: options.effectiveParallelism)
        Terminal.output(ResultTable.render(results, request: request))
        if ablate != nil {
            Terminal.output(ResultTable.render(CompositeAblation.contributions(results, of: request.policies)))
        }
        if let path = options.json { try writeJSON(results, to: path) }
    }
}

/// Runs an evaluation, drawing a progress line on stderr once it has taken more than a second.
func runWithProgress(_ request: EvaluationRequest, parallelism: Int) async throws -> [EvaluationResult] {
    let runner: EvaluationRunner
    do {
        runner = try EvaluationRunner(request: request)
    } catch {
        throw usageFailure(error.message)
    }
    let clock = ContinuousClock()
    let start = clock.now
    let shown = ProgressLine()
    let results = try await runner.run(parallelism: parallelism) { p in
        let elapsed = clock.now - start
        guard elapsed > .seconds(1) else { return }
        shown.draw(
            "sequence \(p.sequence + 1)/\(p.sequences), \(p.phase) \(p.layersDone)/\(p.layers) layers, "
                + "\(Int(elapsed.components.seconds)) s"
        )
    }
    shown.finish()
    return results
}

/// One status line on stderr, redrawn in place on a terminal, printed every few seconds otherwise.
final class ProgressLine: Sendable {
    private let state = Mutex<(drawn: Bool, lastPlain: ContinuousClock.Instant?)>((false, nil))

    func draw(_ text: String) {
        state.withLock { state in
            if Terminal.stderrIsTerminal {
                Terminal.error("\r\u{1B}[K[tessera] \(text)")
                state.drawn = true
            } else if state.lastPlain.map({ ContinuousClock.now - $0 > .seconds(5) }) ?? true {
                Terminal.error("[tessera] \(text)\n")
                state.lastPlain = .now
            }
        }
    }

    func finish() {
        state.withLock { if $0.drawn { Terminal.error("\n") } }
    }
}

func writeJSON(_ results: [EvaluationResult], to path: String) throws {
    struct Document: Encodable { var results: [EvaluationResult] }
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    let data = try encoder.encode(Document(results: results))
    do {
        try data.write(to: URL(filePath: path))
    } catch {
        Terminal.error("error: cannot write \(path): \(error)\n")
        throw ExitCode(1)
    }
}

import KVCacheCore
import Testing
import Workloads

@testable import Evaluation

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

@Suite struct EvaluationRunnerTests {
    static func run(budgets: [Double], seed: UInt64, scalar: ScalarType = .float32) async throws -> [EvaluationResult] {
        let request = EvaluationRequest(
            preset: .imageQA,
            geometry: .tiny,
            policies: try CompressionPolicy.allNames.map { try CompressionPolicy.named($0) },
            budgets: budgets,
            sequences: 2,
            seed: seed,
            scalar: scalar
        )
        return try await EvaluationRunner(request: request).run(parallelism: 2)
    }

    /// At budget 1 every policy keeps the whole prompt and reproduces the full cache exactly, except
    /// VL-Cache, whose clipped layer fractions are not renormalised (the paper): sparse layers keep
    /// less.
    @Test func everyPolicyAtFullBudgetIsExact() async throws {
        let seed: UInt64 = 3
        let results = try await Self.run(budgets: [1], seed: seed)
        let clipped = ["vl-cache"]
        for name in clipped {
            let result = try #require(results.first { $0.policy == name })
            #expect(result.keptBytes < result.fullBytes, "\(name)")
        }
        for result in results where !clipped.contains(result.policy) {
            #expect(result.outputError == 0, "seed \(seed): \(result.policy)")
            #expect(result.keptBytes == result.fullBytes, "seed \(seed): \(result.policy)")
            #expect(result.hitRate == 1, "seed \(seed): \(result.policy)")
        }
    }

    @Test func smallBudgetsSaveBytesAndCostFidelity() async throws {
        let seed: UInt64 = 5
        let results = try await Self.run(budgets: [0.1, 0.3], seed: seed, scalar: .float16)
        for result in results where result.policy != "full" {
            #expect(result.keptBytes < result.fullBytes, "seed \(seed): \(result.policy) at \(result.budget)")
            #expect(result.outputError > 0, "seed \(seed): \(result.policy) at \(result.budget)")
        }
        let full = try #require(results.first { $0.policy == "full" })
        #expect(full.outputError == 0)
        // Uniform methods keep round(α·m) rows per head.
        for name in ["streaming-llm", "snapkv", "h2o"] {
            let row = try #require(results.first { $0.policy == name && $0.budget == 0.1 })
            let ratio = Double(row.keptBytes) / Double(row.fullBytes)
            #expect(abs(ratio - 0.1) < 0.01, "seed \(seed): \(name) kept \(ratio)")
            #expect(row.headShareMin == row.headShareMax, "seed \(seed): \(name) gives every head the same")
            #expect(abs(row.headShareMin - ratio) < 0.01, "seed \(seed): \(name)")
        }
        // Layer budgets from each layer's statistics give heads different shares (on the tiny model's
        // few rows, PyramidKV's, AdaKV's and MadaKV's budgets come out even).
        for name in ["vl-cache", "tgv", "composite"] {
            let row = try #require(results.first { $0.policy == name && $0.budget == 0.1 })
            #expect(
                row.headShareMin < row.headShareMax,
                "seed \(seed): \(name) \(row.headShareMin)…\(row.headShareMax)"
            )
        }
    }

    @Test func resultsAreReproducible() async throws {
        let a = try await Self.run(budgets: [0.2], seed: 9)
        let b = try await Self.run(budgets: [0.2], seed: 9)
        #expect(a.map(\.outputError) == b.map(\.outputError))
        #expect(a.map(\.keptBytes) == b.map(\.keptBytes))
    }

    @Test func badRequestsAreRefused() throws {
        let request = EvaluationRequest(
            preset: .imageQA,
            geometry: .tiny,
            policies: [.full],
            budgets: [0.1, 1.2],
            sequences: 1,
            seed: 1
        )
        #expect(throws: KVCacheError.self) { try EvaluationRunner(request: request) }
    }
}

/// `tessera eval --traces`: the same traces read from files give the same table as generated.
@Suite struct TraceFileEvaluationTests {
    @Test func exportedTracesEvaluateExactlyAsGenerated() async throws {
        let seed: UInt64 = 21
        let policies = try ["snapkv", "vl-cache", "look-m"].map { try CompressionPolicy.named($0) }
        var request = EvaluationRequest(
            preset: .multiImage,
            geometry: .tiny,
            policies: policies,
            budgets: [0.2],
            sequences: 2,
            seed: seed
        )
        let generated = try await EvaluationRunner(request: request).run(parallelism: 2)
        let generator = TraceGenerator(preset: .multiImage, geometry: .tiny, seed: seed)
        let folder = FileManager.default.temporaryDirectory.path
        var files: [TraceFile] = []
        for index in 0..<2 {
            let path = "\(folder)/tessera-eval-\(ProcessInfo.processInfo.processIdentifier)-\(index).safetensors"
            defer { try? FileManager.default.removeItem(atPath: path) }
            try TraceFile.write(generator.sequence(index), to: path)
            files.append(try TraceFile(contentsOf: path))
        }
        request.traceFiles = files
        let read = try await EvaluationRunner(request: request).run(parallelism: 2)
        #expect(read.map(\.keptBytes) == generated.map(\.keptBytes), "seed \(seed)")
        #expect(read.map(\.outputError) == generated.map(\.outputError), "seed \(seed)")
        #expect(read.map(\.needleAccuracy) == generated.map(\.needleAccuracy), "seed \(seed)")
        #expect(read.map(\.hitRate) == generated.map(\.hitRate), "seed \(seed)")
    }
}

/// `tessera compress`: one policy's pipeline over one trace keeps what the evaluation keeps, in
/// position order, and writes it so that it reads back.
@Suite struct TraceCompressorTests {
    @Test func itKeepsWhatTheEvaluationKeepsAndWritesItBack() async throws {
        let seed: UInt64 = 22
        let names = ["streaming-llm", "h2o", "snapkv", "pyramidkv", "vl-cache", "madakv", "look-m"]
        let policies = try names.map { try CompressionPolicy.named($0) }
        let request = EvaluationRequest(
            preset: .imageQA,
            geometry: .tiny,
            policies: policies,
            budgets: [0.25],
            sequences: 1,
            seed: seed
        )
        let evaluated = try await EvaluationRunner(request: request).run(parallelism: 2)
        let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: seed).sequence(0)
        let m = trace.layout.promptLength
        for (policy, result) in zip(policies, evaluated) {
            let kept = try TraceCompressor.compress(trace, policy: policy, retention: 0.25, threads: 2)
            let heads = kept.layers.joined()
            #expect(heads.reduce(0) { $0 + $1.payloadBytes } == result.keptBytes, "seed \(seed): \(policy.name)")
            for head in heads {
                #expect(head.positions == head.positions.sorted(), "seed \(seed): \(policy.name)")
                #expect(head.positions.allSatisfy { (0..<Int32(m)).contains($0) }, "seed \(seed): \(policy.name)")
            }
        }
        // StreamingLLM keeps the 4 sinks and the most recent rows, nothing in between.
        let streaming = try TraceCompressor.compress(trace, policy: policies[0], retention: 0.25).layers[0][0]
        let recent = streaming.count - 4
        #expect(streaming.positions == Array(0..<4) + ((m - recent)..<m).map(Int32.init), "seed \(seed)")

        let path =
            "\(FileManager.default.temporaryDirectory.path)/tessera-kept-\(ProcessInfo.processInfo.processIdentifier).safetensors"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let snap = try TraceCompressor.compress(trace, policy: policies[2], retention: 0.25)
        try snap.write(to: path, geometry: .tiny, policy: "snapkv", retention: 0.25)
        let file = try SafeTensors(contentsOf: path)
        let head = snap.layers[3][1]
        #expect(try file.int32s("layers.3.heads.1.kept", shape: [head.count]) == head.positions)
        #expect(try file.floats("layers.3.heads.1.values", shape: [head.count, head.headDim]) == head.values)
        #expect(file.metadata["policy"] == "snapkv" && file.metadata["format"] == "tessera.kept.v1")
    }
}

@Suite struct CompositeAblationTests {
    /// Errors built so that layer budgets cut 0.2, the head split nothing and merging adds 0.1:
    /// the contributions read back exactly that, each averaged over the other parts' settings.
    @Test func contributionsAreTheMeanDifferenceOfEachPart() {
        let results = CompositeAblation.variants().map { policy in
            guard case .composite(let s) = policy else { preconditionFailure("not a composite") }
            let error = 1.0 - (s.layerBudgets ? 0.2 : 0) + (s.merge != .none ? 0.1 : 0)
            return EvaluationResult(
                policy: policy.label,
                budget: 0.1,
                keptBytes: 1,
                fullBytes: 10,
                outputError: error,
                outputCosine: 1,
                massRecall: 1,
                needleAccuracy: s.headSplit ? 1 : 0.5,
                hitRate: 0,
                compressMillis: 0,
                mergedRows: 0,
                headShareMin: 0.1,
                headShareMax: 0.1
            )
        }
        #expect(Set(results.map(\.policy)).count == 8)
        let byPart = Dictionary(
            uniqueKeysWithValues: CompositeAblation.contributions(results, of: CompositeAblation.variants()).map {
                ($0.part, $0)
            }
        )
        #expect(abs(byPart[.layers]!.errorReduction - 0.2) < 1e-12)
        #expect(abs(byPart[.heads]!.errorReduction) < 1e-12)
        #expect(abs(byPart[.merge]!.errorReduction + 0.1) < 1e-12)
        #expect(byPart[.heads]!.needleGain == 0.5)
    }
}

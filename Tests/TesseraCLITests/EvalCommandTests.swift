import ClusterLauncher
import FoundationEssentials
import Subprocess
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

struct CommandResult {
    var status: TerminationStatus
    var stdout: String
    var stderr: String
}

func runTessera(_ arguments: [String]) async throws -> CommandResult {
    let result = try await run(
        .path(LocalCluster.siblingBinary),
        arguments: Arguments(arguments),
        input: .none,
        output: .string(limit: 1 << 20),
        error: .string(limit: 1 << 20)
    )
    return CommandResult(
        status: result.terminationStatus,
        stdout: result.standardOutput,
        stderr: result.standardError
    )
}

@Suite struct EvalCommandTests {
    @Test(arguments: [
        (["eval", "--policies", "vl-cache,lru"], "allowed: full, streaming-llm"),
        (["eval", "--budgets", "0.1,1.5"], "(0, 1]"),
        (["eval", "--budgets", "0"], "(0, 1]"),
        (["eval", "--workload", "podcast"], "allowed: image-qa"),
        (["eval", "--model", "gpt-4"], "allowed: llava-1.5-7b"),
        (["eval", "--dtype", "bf16"], "allowed: f32, f16"),
        (["eval", "--policies", "snapkv", "--policy-option", "snapkv.window"], "POLICY.KEY=VALUE"),
        (["eval", "--policies", "snapkv", "--policy-option", "tgv.sinks=2"], "not among the chosen policies snapkv"),
        (
            ["eval", "--policies", "composite", "--policy-option", "composite.blend=1"],
            "layerBudgets, headSplit, merge"
        ),
        (["eval", "--policies", "composite", "--policy-option", "composite.merge=some"], "averaged, pivotal"),
        (["eval", "--ablate", "snapkv"], "the only value is composite"),
    ])
    func badInputExits64WithOneLine(arguments: [String], allowed: String) async throws {
        let result = try await runTessera(arguments)
        #expect(result.status == .exited(64), "\(arguments): \(result.stderr)")
        let lines = result.stderr.split(separator: "\n")
        #expect(lines.count == 1, "\(arguments): expected one line, got \(result.stderr)")
        #expect(result.stderr.contains(allowed), "\(arguments): \(result.stderr)")
    }

    @Test func evalPrintsEveryPolicyAndWritesJSON() async throws {
        let path = "/tmp/tessera-eval-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
        defer { unlink(path) }
        let result = try await runTessera([
            "eval", "--model", "tiny", "--workload", "multi-image", "--budgets", "0.1,0.2", "--sequences", "1",
            "--seed", "7", "--json", path,
        ])
        #expect(result.status == .exited(0), "\(result.stderr)")
        let policies = [
            "full", "streaming-llm", "h2o", "snapkv", "adakv", "pyramidkv", "vl-cache", "madakv", "look-m", "tgv",
            "composite",
        ]
        for policy in policies {
            #expect(result.stdout.contains("\n\(policy) "), "missing \(policy) in\n\(result.stdout)")
        }
        let data = try Data(contentsOf: URL(filePath: path))
        struct Document: Decodable {
            struct Row: Decodable {
                var policy: String
                var budget: Double
                var keptBytes: Int
                var fullBytes: Int
                var outputError: Double
                var needleAccuracy: Double?
                var hitRate: Double
                var compressMillis: Double
            }
            var results: [Row]
        }
        let document = try JSONDecoder().decode(Document.self, from: data)
        #expect(document.results.count == policies.count * 2)
        let full = try #require(document.results.first { $0.policy == "full" })
        #expect(full.outputError == 0 && full.keptBytes == full.fullBytes)
        #expect(document.results.allSatisfy { $0.keptBytes <= $0.fullBytes || $0.policy == "look-m" })
    }

    @Test func ablationPrintsEveryVariantAndEachPartsContribution() async throws {
        let result = try await runTessera([
            "eval", "--model", "tiny", "--workload", "image-qa", "--budgets", "0.2", "--sequences", "1", "--ablate",
            "composite",
        ])
        #expect(result.status == .exited(0), "\(result.stderr)")
        for variant in ["composite ", "composite[layers+heads] ", "composite[merge] ", "composite[none] "] {
            #expect(result.stdout.contains("\n\(variant)"), "missing \(variant) in\n\(result.stdout)")
        }
        for part in ["layers", "heads", "merge"] {
            #expect(result.stdout.contains("\n\(part) "), "missing \(part) in\n\(result.stdout)")
        }
    }

    /// A policy option reaches the policy: without merging, the composite merges no row, and its
    /// label says which parts are on.
    @Test func policyOptionsApply() async throws {
        let result = try await runTessera([
            "eval", "--model", "tiny", "--workload", "image-qa", "--budgets", "0.2", "--sequences", "1", "--policies",
            "composite", "--policy-option", "composite.merge=none", "--policy-option", "composite.layerBudgets=true",
        ])
        #expect(result.status == .exited(0), "\(result.stderr)")
        #expect(result.stdout.contains("\ncomposite[layers+heads] "), "\(result.stdout)")
    }
}

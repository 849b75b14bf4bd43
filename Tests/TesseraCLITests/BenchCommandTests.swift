import Foundation
import Subprocess
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite struct BenchCommandTests {
    @Test(arguments: [
        (["bench", "--policies", "vl-cache,lru"], "allowed: full, streaming-llm"),
        (["bench", "--budget", "1.5"], "(0, 1]"),
        (["bench", "--workload", "podcast"], "allowed: image-qa"),
        (["bench", "--workload", "/nonexistent/workload.yaml"], "/nonexistent/workload.yaml"),
        (["bench", "--concurrency", "2", "--rate", "1"], "not both"),
        (["bench", "--duration", "5", "--sequences", "3"], "not both"),
        (["bench", "--duration", "0s"], "(0, 86400] seconds, got 0.0"),
        (["bench", "--duration", "25h"], "(0, 86400] seconds, got 90000.0"),
        (["bench", "--duration", "1.5m", "--sequences", "3"], "not both"),
        (["bench", "--policy", "full", "--policies", "vl-cache"], "not both"),
        (["bench", "--audit-fraction", "2"], "0...1"),
        (["bench", "--coordinator", "nowhere"], "--coordinator"),
        (["coordinator", "--faults", "drop=2"], "drop=2 must be a probability in 0...1"),
        (["worker", "--coordinator", "127.0.0.1:1", "--faults", "explode=1"], "allowed keys: drop, duplicate"),
        (["chaos", "--scenario", "cluster/scenarios/kill-primary.yaml", "--log-level", "loud"], "allowed: trace"),
        (["chaos", "--scenario", "cluster/scenarios/degrade-primary.yaml"], "give --hosts"),
        (["bench", "--local", "2", "--hosts", "0"], "--hosts must be in 1...64, got 0"),
        (
            ["bench", "--local", "2", "--hosts", "2", "--network", "dealy=2ms"],
            "subnet, delay, jitter, loss, rate, seed"
        ),
        (["bench", "--network", "delay=2ms"], "give --hosts too"),
        (["bench", "--coordinator", "127.0.0.1:1", "--hosts", "2"], "give it with --local"),
        (["cluster", "up", "--hosts", "2", "--network", "jitter=5ms,delay=1ms"], "at most network.delay"),
        (["worker", "--coordinator", "127.0.0.1:1", "--listen", "0.0.0.0:0"], "give --advertise-host"),
        (["bench-wire", "--in-flight", "1,0"], "values in 1...64, got '1,0'"),
    ])
    func badInputExits64WithOneLine(arguments: [String], allowed: String) async throws {
        let result = try await runTessera(arguments)
        #expect(result.status == .exited(64), "\(arguments): \(result.stderr)")
        #expect(result.stderr.split(separator: "\n").count == 1, "\(arguments): \(result.stderr)")
        #expect(result.stderr.contains(allowed), "\(arguments): \(result.stderr)")
    }

    /// bench-wire end to end, briefly: both ways of sending prefills, what each process spent per
    /// frame, and the plain TCP references, in the table and the JSON.
    @Test(.timeLimit(.minutes(3)))
    func benchWireMeasuresIngestBothWaysWithItsCPUTime() async throws {
        let path = "/tmp/tessera-bench-wire-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
        defer { unlink(path) }
        let result = try await runTessera([
            "bench-wire", "--security", "insecure", "--seconds-per-point", "0.1", "--in-flight", "2", "--json", path,
        ])
        #expect(result.status == .exited(0), "\(result.stderr)")
        #expect(result.stdout.contains("one sequence's prefill in parts"), "\(result.stdout)")
        #expect(result.stdout.contains("CPU µs per frame"), "\(result.stdout)")
        let reports = try #require(
            try JSONSerialization.jsonObject(with: Data(contentsOf: URL(filePath: path))) as? [[String: Any]]
        )
        let ingest = try #require(reports.first?["ingest"] as? [[String: Any]])
        #expect(ingest.count == 4)
        for point in ingest {
            for key in ["tessera", "inParts"] {
                let rates = try #require(point[key] as? [[String: Any]], "\(key)")
                #expect(rates.count == 1, "\(key)")
                let rate = try #require(rates.first)
                #expect(((rate["frames"] as? NSNumber)?.intValue ?? 0) > 0, "\(key)")
                let cpu = try #require(rate["cpuMicrosPerFrame"] as? [String: Any], "\(key)")
                // Each frame is read, checked and acknowledged by the worker and sent by this process.
                for process in ["client", "worker"] {
                    #expect(((cpu[process] as? NSNumber)?.doubleValue ?? 0) > 0, "\(key) \(process)")
                }
            }
            let tcp = try #require(point["plainTCP"] as? [String: Any])
            #expect(((tcp["cpuMicrosPerFrame"] as? NSNumber)?.doubleValue ?? 0) > 0)
        }
    }

    /// The whole command: a local cluster, two policies, the table, the three files, and no process
    /// left behind (the cluster's children are reaped before the command exits).
    @Test(.timeLimit(.minutes(3)))
    func benchRunsALocalClusterAndWritesItsFiles() async throws {
        let base = "/tmp/tessera-bench-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { for ext in ["json", "csv", "html"] { unlink("\(base).\(ext)") } }
        let result = try await runTessera([
            "bench", "--local", "2", "--model", "tiny", "--workload", "mixed", "--policies", "full,madakv",
            "--sequences", "3", "--concurrency", "2", "--seed", "11", "--json", "\(base).json", "--csv", "\(base).csv",
            "--report", "\(base).html",
        ])
        #expect(result.status == .exited(0), "\(result.stderr)")
        #expect(result.stdout.contains("\nfull "), "\(result.stdout)")
        #expect(result.stdout.contains("\nmadakv "), "\(result.stdout)")
        let json =
            try JSONSerialization.jsonObject(with: Data(contentsOf: URL(filePath: "\(base).json"))) as? [String: Any]
        let policies = try #require(json?["policies"] as? [[String: Any]])
        #expect(policies.count == 2)
        for key in [
            "policy", "budget", "sequences", "tokensPerSecond", "decodeP50Micros", "decodeP99Micros",
            "peakKVBytes", "fullKVBytes", "saving", "outputError", "needleAccuracy", "errors", "refusals",
            "workers",
        ] {
            #expect(policies[0][key] != nil, "missing \(key)")
        }
        // The workers' prefill compute and the footprint integral reach the report: MadaKV profiles
        // its proxy rows, both synthesise and hold bytes over time. (Comparing the two policies'
        // times would be a timed test: on a loaded machine the idle one can take longer.)
        func number(_ policy: Int, _ key: String) -> Double { (policies[policy][key] as? NSNumber)?.doubleValue ?? -1 }
        for policy in 0..<2 {
            for key in ["synthesisMillis", "compressMillis", "kvByteSeconds", "decodeThroughput"] {
                #expect(number(policy, key) > 0, "\(policies[policy]["policy"] ?? "?") \(key)")
            }
        }
        #expect(number(1, "profileMillis") > 0, "madakv profiles its proxy rows")
        // The workers' head row shares reach the report: the full cache keeps every prompt row of
        // every head, MadaKV at the default budget keeps part of them.
        #expect(number(0, "headShareMin") == 1 && number(0, "headShareMax") == 1)
        #expect(number(1, "headShareMin") > 0 && number(1, "headShareMin") <= number(1, "headShareMax"))
        #expect(number(1, "headShareMax") < 1)
        #expect(result.stdout.contains("head rows %"))
        let csv = try String(contentsOfFile: "\(base).csv", encoding: .utf8)
        #expect(csv.hasPrefix("policy,elapsed_ms,worker,kv_bytes"))
        #expect(csv.split(separator: "\n").count > 2)
        let html = try String(contentsOfFile: "\(base).html", encoding: .utf8)
        #expect(html.contains("<svg") && html.contains("madakv") && html.contains("head rows %"))
    }
}

import Testing

@testable import LoadGenerator

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The bench's output files: CSV, JSON and the self-contained HTML report.
@Suite struct ReportRenderingTests {
    // MARK: CSV

    @Test func csvHasTheHeaderAndOneRowPerSample() {
        let csv = CSVWriter.render([sample(policy: "snapkv", at: 250, worker: "w1", kv: 1024)])
        let header =
            "policy,elapsed_ms,worker,kv_bytes,text_bytes,image_bytes,video_bytes,audit_bytes,rss_bytes,"
            + "live_sequences\n"
        #expect(csv == header + "snapkv,250,w1,1024,512,256,256,0,4096,3\n")
        #expect(CSVWriter.render([]) == CSVWriter.header + "\n")
    }

    @Test(arguments: [
        ("plain", "plain"),
        ("a,b", "\"a,b\""),
        ("say \"hi\"", "\"say \"\"hi\"\"\""),
        ("two\nlines", "\"two\nlines\""),
        ("crlf\r\nend", "\"crlf\r\nend\""),
    ])
    func csvQuotesPerRFC4180(field: String, quoted: String) {
        let csv = CSVWriter.render([sample(policy: field, at: 0, worker: "w,1", kv: 0)])
        let row = String(csv.dropFirst(CSVWriter.header.count + 1))
        #expect(row.hasPrefix(quoted + ",0,\"w,1\",0,"), "\(row)")
    }

    // MARK: JSON

    @Test func jsonHasTheRequiredShapeWithNulls() throws {
        let json = try JSONWriter.render(report())
        let root = try JSONDecoder().decode(JSONValue.self, from: Data(json.utf8))
        let policies = try #require(root["policies"]?.array)
        #expect(policies.count == 2)
        let keys = [
            "policy", "budget", "sequences", "tokensPerSecond", "decodeP50Micros", "decodeP99Micros", "peakKVBytes",
            "fullKVBytes", "saving", "outputError", "needleAccuracy", "errors", "refusals", "workers",
            "decodeThroughput", "synthesisMillis", "profileMillis", "compressMillis", "kvByteSeconds",
            "headShareMin", "headShareMax",
        ]
        for policy in policies {
            for key in keys {
                #expect(policy[key] != nil, "missing \(key)")
            }
            let saving = try #require(policy["saving"]?.number)
            #expect(saving >= 0 && saving <= 1)
            let workers = try #require(policy["workers"]?.array)
            for key in ["id", "peakKVBytes", "peakRSSBytes"] {
                #expect(workers.allSatisfy { $0[key] != nil }, "worker missing \(key)")
            }
        }
        #expect(policies[0]["outputError"] == .null)
        #expect(policies[0]["needleAccuracy"] == .null)
        #expect(policies[1]["outputError"] == .number(0.0125))
        #expect(policies[1]["needleAccuracy"] == .number(0.75))
        #expect(json.contains("\n  "), "pretty-printed")
        #expect(json.firstRange(of: "\"loop\"")!.lowerBound < json.firstRange(of: "\"model\"")!.lowerBound, "sorted")
    }

    @Test func jsonDecodesBackToTheReport() throws {
        let original = report()
        let json = try JSONWriter.render(original)
        #expect(try JSONDecoder().decode(BenchReport.self, from: Data(json.utf8)) == original)
    }

    // MARK: HTML

    @Test func htmlIsSelfContainedWithOneSVGPerChart() {
        let html = HTMLReport.render(report(), samples: samples())
        #expect(html.hasPrefix("<!DOCTYPE html>"))
        for forbidden in ["http://", "https://", "src=", "href=", "@import", "url("] {
            #expect(!html.contains(forbidden), "found \(forbidden)")
        }
        // The policies' totals on shared axes, one latency chart, then K/V and modality charts per policy.
        #expect(html.ranges(of: "<svg").count == 1 + 1 + 2 * 2)
        #expect(html.contains("Accounted K/V, all workers, per policy"))
        #expect(html.contains("Prefill cost per sequence"))
        #expect(html.contains("<path d=\"M"), "series drawn")
        #expect(html.contains("stroke-dasharray"), "RSS drawn dashed")
        expectFinite(html)
    }

    @Test func htmlEscapesEmbeddedNames() {
        var report = report()
        report.workload = "a&b"
        report.policies[0].policy = "<script>alert('x')</script>"
        let html = HTMLReport.render(
            report,
            samples: [sample(policy: "<script>alert('x')</script>", at: 0, worker: "\"w\"", kv: 1)]
        )
        #expect(!html.contains("<script"))
        #expect(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"))
        #expect(html.contains("a&amp;b"))
        #expect(html.contains("&quot;w&quot; KV"))
    }

    @Test func htmlRendersEmptyAndDegenerateInputs() {
        let empty = BenchReport(workload: "w", model: "m", workers: 0, seed: 0, loop: "closed", load: 0, policies: [])
        let emptyHTML = HTMLReport.render(empty, samples: [])
        // The policies' footprint comparison and the latency chart, both empty.
        #expect(emptyHTML.ranges(of: "<svg").count == 2)
        expectFinite(emptyHTML)

        // No samples for a policy, non-finite numbers, and zero peaks.
        var report = report()
        report.policies[0].saving = .nan
        report.policies[0].tokensPerSecond = .infinity
        report.policies[0].decodeThroughput = .nan
        report.policies[0].kvByteSeconds = .infinity
        report.policies[0].decodeLatencyPercentiles = [
            LatencyPoint(percentile: 100, micros: 0), LatencyPoint(percentile: .nan, micros: 5),
        ]
        report.policies[1].workers = [WorkerPeak(id: "w1", peakKVBytes: 0, peakRSSBytes: 0, peakAuditBytes: 0)]
        report.policies[1].decodeLatencyPercentiles = []
        let noSamples = HTMLReport.render(report, samples: [])
        #expect(noSamples.contains("no samples"))
        #expect(noSamples.ranges(of: "<svg").count == 6)
        expectFinite(noSamples)

        // A single sample, and all-zero samples.
        let single = HTMLReport.render(self.report(), samples: [sample(policy: "full", at: 0, worker: "w1", kv: 0)])
        #expect(single.contains("<circle"))
        expectFinite(single)
        let zeros = (0..<3).map { t in
            FootprintSample(
                policy: "snapkv",
                elapsedMillis: t * 100,
                worker: "w1",
                kvBytes: 0,
                textBytes: 0,
                imageBytes: 0,
                videoBytes: 0,
                auditBytes: 0,
                rssBytes: 0,
                liveSequences: 0
            )
        }
        expectFinite(HTMLReport.render(report, samples: zeros))
    }

    /// Workers sampled at different instants: the totals carry each worker's last sample.
    @Test func footprintTotalsCarryWorkersForward() {
        let mib = UInt64(1_048_576)
        let totals = HTMLReport.footprintTotals([
            sample(policy: "p", at: 0, worker: "a", kv: 4 * mib, text: mib),
            sample(policy: "p", at: 5, worker: "b", kv: 8 * mib, text: 2 * mib),
            sample(policy: "p", at: 1000, worker: "a", kv: 2 * mib, text: 3 * mib),
        ])
        #expect(totals.map(\.x) == [0, 0.005, 1])
        #expect(totals.map(\.kv) == [4, 12, 10])
        #expect(totals.map(\.text) == [1, 3, 5])
    }

    @Test func numbersAreFormattedWithoutFoundation() {
        #expect(HTMLReport.decimal(1.25, 1) == "1.3")
        #expect(HTMLReport.decimal(0.04, 1) == "0.0")
        #expect(HTMLReport.decimal(-2.5, 2) == "-2.50")
        #expect(HTMLReport.decimal(-0.01, 1) == "0.0")
        #expect(HTMLReport.decimal(12, 0) == "12")
        #expect(HTMLReport.decimal(.nan, 1) == "—")
        #expect(HTMLReport.mib(3 * 1_048_576 / 2) == "1.5")
        #expect(HTMLReport.trimmed(8) == "8")
        #expect(HTMLReport.trimmed(2.50) == "2.5")
        #expect(HTMLReport.niceStep(0.7) == 1)
        #expect(HTMLReport.niceStep(13) == 20)
        #expect(HTMLReport.niceStep(0) == 1)
        #expect(abs(HTMLReport.nines(99.9) - 3) < 1e-9)
    }

    // MARK: Fixtures

    func expectFinite(_ html: String, sourceLocation: SourceLocation = #_sourceLocation) {
        for bad in ["NaN", "nan", "inf", "Inf"] {
            #expect(!html.contains(bad), "found \(bad)", sourceLocation: sourceLocation)
        }
    }

    func sample(
        policy: String,
        at millis: Int,
        worker: String,
        kv: UInt64,
        text: UInt64 = 512
    ) -> FootprintSample {
        FootprintSample(
            policy: policy,
            elapsedMillis: millis,
            worker: worker,
            kvBytes: kv,
            textBytes: text,
            imageBytes: 256,
            videoBytes: 256,
            auditBytes: 0,
            rssBytes: 4096,
            liveSequences: 3
        )
    }

    /// Two policies, two workers sampled 7 ms apart, growing by 1 MiB per modality per sample.
    func samples() -> [FootprintSample] {
        let mib: UInt64 = 1_048_576
        var samples: [FootprintSample] = []
        for policy in ["full", "snapkv"] {
            for (offset, worker) in [(0, "w1"), (7, "w2")] {
                for t in 0..<5 {
                    let grown = UInt64(t) * mib
                    samples.append(
                        FootprintSample(
                            policy: policy,
                            elapsedMillis: t * 200 + offset,
                            worker: worker,
                            kvBytes: 3 * grown,
                            textBytes: grown,
                            imageBytes: grown,
                            videoBytes: grown,
                            auditBytes: mib,
                            rssBytes: 40 * mib + grown,
                            liveSequences: t
                        )
                    )
                }
            }
        }
        return samples
    }

    func report() -> BenchReport {
        func result(_ name: String, budget: Double, outputError: Double?, needle: Double?) -> PolicyResult {
            PolicyResult(
                policy: name,
                budget: budget,
                sequences: 12,
                decodeTokens: 384,
                durationSeconds: 2,
                tokensPerSecond: 192,
                decodeP50Micros: 1500,
                decodeP99Micros: 4200,
                decodeMaxMicros: 9000,
                prefillP50Micros: 20_000,
                prefillP99Micros: 41_000,
                peakKVBytes: 12 << 20,
                meanKVBytes: 6 << 20,
                fullKVBytes: 30 << 20,
                compressedKVBytes: UInt64(Double(30 << 20) * budget),
                saving: 1 - budget,
                outputError: outputError,
                needleAccuracy: needle,
                auditedSequences: 2,
                errors: 0,
                refusals: 1,
                retries: 1,
                workers: [
                    WorkerPeak(id: "w1", peakKVBytes: 6 << 20, peakRSSBytes: 80 << 20, peakAuditBytes: 1 << 20),
                    WorkerPeak(id: "w2", peakKVBytes: 6 << 20, peakRSSBytes: 81 << 20, peakAuditBytes: 0),
                ],
                decodeLatencyPercentiles: [0, 50, 90, 99, 99.9, 100].enumerated().map {
                    LatencyPoint(percentile: $1, micros: UInt64(1000 * ($0 + 1)))
                }
            )
        }
        return BenchReport(
            workload: "image-qa",
            model: "tiny",
            workers: 2,
            seed: 42,
            loop: "closed",
            load: 4,
            policies: [
                result("full", budget: 1, outputError: nil, needle: nil),
                result("snapkv", budget: 0.2, outputError: 0.0125, needle: 0.75),
            ]
        )
    }
}

/// Any JSON value, to check the written shape (including explicit nulls) without Foundation's
/// `JSONSerialization`.
enum JSONValue: Decodable, Equatable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let n = try? c.decode(Double.self) {
            self = .number(n)
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let a = try? c.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    subscript(key: String) -> JSONValue? {
        if case .object(let o) = self { return o[key] }
        return nil
    }

    var array: [JSONValue]? {
        if case .array(let a) = self { return a }
        return nil
    }

    var number: Double? {
        if case .number(let n) = self { return n }
        return nil
    }
}

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Renders a bench report as the `--json` file: pretty-printed, sorted keys, and every optional
/// written (`null` when absent) so readers can rely on the shape. It decodes back as a `BenchReport`.
public enum JSONWriter {
    /// - Throws: `EncodingError` if the report holds a non-finite number (JSON has none).
    public static func render(_ report: BenchReport) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(ReportJSON(report: report)), as: UTF8.self)
    }
}

/// The report with its policies wrapped, field by field (the synthesised keys are private to the type).
private struct ReportJSON: Encodable {
    var report: BenchReport

    enum CodingKeys: String, CodingKey {
        case workload, model, workers, seed, loop, load, policies
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(report.workload, forKey: .workload)
        try c.encode(report.model, forKey: .model)
        try c.encode(report.workers, forKey: .workers)
        try c.encode(report.seed, forKey: .seed)
        try c.encode(report.loop, forKey: .loop)
        try c.encode(report.load, forKey: .load)
        try c.encode(report.policies.map(PolicyJSON.init), forKey: .policies)
    }
}

/// Synthesised `Encodable` skips nil optionals; this adds them back as `null`.
private struct PolicyJSON: Encodable {
    var result: PolicyResult

    enum NullableKeys: String, CodingKey {
        case outputError, needleAccuracy, headShareMin, headShareMax
    }

    func encode(to encoder: any Encoder) throws {
        try result.encode(to: encoder)
        // A second keyed container at the same level adds keys to the same JSON object.
        var c = encoder.container(keyedBy: NullableKeys.self)
        if result.outputError == nil { try c.encodeNil(forKey: .outputError) }
        if result.needleAccuracy == nil { try c.encodeNil(forKey: .needleAccuracy) }
        if result.headRowShares == nil {
            try c.encodeNil(forKey: .headShareMin)
            try c.encodeNil(forKey: .headShareMax)
        }
    }
}

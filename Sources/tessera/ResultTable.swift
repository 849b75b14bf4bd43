import Evaluation
import KVCacheCore
import Workloads

/// The evaluation table, one row per policy and budget.
enum ResultTable {
    static func render(_ results: [EvaluationResult], request: EvaluationRequest) -> String {
        let header = [
            "policy", "budget", "kept bytes", "% of full", "head rows %", "output err", "needle acc", "hit rate",
            "compress ms",
        ]
        var rows: [[String]] = []
        for r in results {
            rows.append([
                r.policy,
                format(r.budget, 2),
                bytes(r.keptBytes),
                format(100 * Double(r.keptBytes) / Double(max(1, r.fullBytes)), 1),
                percentages(HeadRowShares(min: r.headShareMin, max: r.headShareMax)),
                format(r.outputError, 4),
                r.needleAccuracy.map { format($0, 3) } ?? "-",
                format(r.hitRate, 3),
                format(r.compressMillis, 1),
            ])
        }
        let title =
            request.traceFiles.isEmpty
            ? "\(request.preset.rawValue) on \(request.geometry.name), \(request.sequences) sequence(s), "
                + "seed \(request.seed), \(request.scalar.rawValue)\n"
            : "\(request.traceFiles.count) trace file(s) of \(request.geometry.name), \(request.scalar.rawValue)\n"
        return title + table(header: header, rows: rows)
    }

    /// A spread of head row shares as percentages, `min–max`.
    static func percentages(_ shares: HeadRowShares) -> String {
        "\(format(100 * shares.min, 1))–\(format(100 * shares.max, 1))"
    }

    /// What each part of the composite contributes (`eval --ablate composite`).
    static func render(_ contributions: [CompositeAblation.Contribution]) -> String {
        let rows = contributions.map { c in
            [
                c.part.rawValue,
                format(c.budget, 2),
                format(c.errorReduction, 4),
                format(100 * c.relativeErrorReduction, 1),
                c.needleGain.map { format($0, 3) } ?? "-",
            ]
        }
        return "\ncontribution of each part: switched on, averaged over the other parts' four settings "
            + "(positive helps)\n"
            + table(header: ["part", "budget", "output err ↓", "% of err", "needle acc ↑"], rows: rows)
    }

    /// Columns padded to their widest cell; the first left-aligned, the others right-aligned.
    static func table(header: [String], rows: [[String]]) -> String {
        let widths = header.indices.map { c in ([header[c]] + rows.map { $0[c] }).map(\.count).max()! }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { c, text in
                c == 0 ? text.padding(widths[c]) : String(repeating: " ", count: widths[c] - text.count) + text
            }.joined(separator: "  ") + "\n"
        }
        var out = line(header)
        out += line(widths.map { String(repeating: "-", count: $0) })
        for row in rows { out += line(row) }
        return out
    }

    static func format(_ value: Double, _ decimals: Int) -> String {
        guard value.isFinite else { return "\(value)" }
        var scale = 1.0
        for _ in 0..<decimals { scale *= 10 }
        let rounded = (abs(value) * scale).rounded()
        let whole = Int(rounded / scale)
        let fraction = Int(rounded) - whole * Int(scale)
        let sign = value < 0 && rounded > 0 ? "-" : ""
        guard decimals > 0 else { return "\(sign)\(whole)" }
        let digits = String(fraction)
        return "\(sign)\(whole).\(String(repeating: "0", count: decimals - digits.count))\(digits)"
    }

    static func bytes(_ count: Int) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(count)
        var unit = 0
        while value >= 1024, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(count) B" : "\(format(value, 1)) \(units[unit])"
    }
}

extension String {
    func padding(_ width: Int) -> String { self + String(repeating: " ", count: max(0, width - count)) }
}

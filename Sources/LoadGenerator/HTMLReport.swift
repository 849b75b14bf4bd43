import KVCacheCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Renders a bench run as one self-contained HTML page (the `--html` file): inline CSS and SVG
/// charts, no scripts, fonts or other resources, so it opens offline and can be attached anywhere.
public enum HTMLReport {
    /// - Parameters:
    ///   - report: The runs to compare; `decodeLatencyPercentiles` use percentiles from 0 to 100.
    ///   - samples: Footprint samples of every policy's run, in any order.
    public static func render(_ report: BenchReport, samples: [FootprintSample]) -> String {
        var html = """
            <!DOCTYPE html>
            <html lang="en">
            <head>
            <meta charset="utf-8">
            <title>Tessera bench: \(escape(report.workload))</title>
            <style>\(css)</style>
            </head>
            <body>
            <h1>Tessera bench</h1>

            """
        let load = "\(trimmed(report.load)) \(report.loop == "open" ? "arrivals/s" : "concurrent")"
        let run = [report.workload, report.model, String(report.workers), String(report.seed), report.loop, load]
        html += table(header: ["workload", "model", "workers", "seed", "loop", "load"], rows: [run], textColumns: 6)
        html += "<h2>Policies</h2>\n" + comparisonTable(report.policies)
        html += "<p>head rows %: the smallest and the largest share of the prompt's rows that one KV head of "
        html += "one layer keeps, mean over the sequences (equal for a policy that spreads its budget evenly).</p>\n"
        html += "<h2>Accounted K/V over time</h2>\n" + footprintComparison(report, samples)
        html += "<h2>Prefill cost per sequence</h2>\n" + costTable(report.policies)
        html += "<h2>Decode-step latency</h2>\n" + latencyChart(report.policies)
        for policy in policyNames(report, samples) {
            html += "<h2>Footprint: \(escape(policy))</h2>\n"
            html += footprintCharts(samples.filter { $0.policy == policy })
        }
        html += "<h2>Worker peaks</h2>\n" + peakTable(report.policies)
        html += "</body>\n</html>\n"
        return html
    }

    static let css = """
        body{font-family:system-ui,sans-serif;margin:24px;color:#222}
        table{border-collapse:collapse;margin:8px 0 24px;font-size:13px}
        th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
        th{background:#f3f3f3}
        .t{text-align:left}
        svg{display:block;margin:8px 0 16px;font-size:11px}
        """

    /// Tableau 10: distinct, and readable on white.
    static let palette = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
    ]

    static let mebibyte = 1_048_576.0

    // MARK: Sections

    static func comparisonTable(_ policies: [PolicyResult]) -> String {
        let header = [
            "policy", "budget", "sequences", "tokens/s", "decode p50 ms", "decode p99 ms", "decode max ms",
            "ttft p50 ms", "ttft p99 ms", "peak KV MiB", "mean KV MiB", "full KV MiB", "saving %",
            "head rows %", "output error", "needle accuracy %", "errors", "refusals",
        ]
        let rows = policies.map { p in
            [
                p.policy, decimal(p.budget, 2), String(p.sequences), decimal(p.tokensPerSecond, 1),
                millis(p.decodeP50Micros), millis(p.decodeP99Micros), millis(p.decodeMaxMicros),
                millis(p.prefillP50Micros), millis(p.prefillP99Micros), mib(p.peakKVBytes), mib(p.meanKVBytes),
                mib(p.fullKVBytes), decimal(p.saving * 100, 1),
                p.headRowShares.map { "\(decimal($0.min * 100, 1))–\(decimal($0.max * 100, 1))" } ?? "—",
                p.outputError.map { decimal($0, 4) } ?? "—",
                p.needleAccuracy.map { decimal($0 * 100, 1) } ?? "—", String(p.errors), String(p.refusals),
            ]
        }
        return table(header: header, rows: rows, textColumns: 1)
    }

    static func costTable(_ policies: [PolicyResult]) -> String {
        let header = [
            "policy", "decode tokens/s per sequence", "synthesis ms", "profile ms", "compress ms", "K/V GiB·s",
        ]
        let rows = policies.map { p in
            [
                p.policy, decimal(p.decodeThroughput, 1), decimal(p.synthesisMillis, 1), decimal(p.profileMillis, 1),
                decimal(p.compressMillis, 1), decimal(p.kvByteSeconds / (mebibyte * 1024), 2),
            ]
        }
        return table(header: header, rows: rows, textColumns: 1)
    }

    /// Every policy's total accounted K/V on shared axes, seconds from the start of its own run; the
    /// full cache, when it ran, is the dashed reference.
    static func footprintComparison(_ report: BenchReport, _ samples: [FootprintSample]) -> String {
        let series = policyNames(report, samples).enumerated().map { i, policy in
            ChartSeries(
                name: policy,
                color: palette[i % palette.count],
                points: footprintTotals(samples.filter { $0.policy == policy }).map { ChartPoint(x: $0.x, y: $0.kv) },
                style: policy == "full" ? .dashed : .line
            )
        }
        return chart(
            title: "Accounted K/V, all workers, per policy",
            x: ChartAxis(label: "seconds"),
            y: ChartAxis(label: "MiB"),
            series: series
        )
    }

    static func peakTable(_ policies: [PolicyResult]) -> String {
        let header = ["policy", "worker", "peak KV MiB", "peak RSS MiB", "peak audit MiB", "RSS ÷ (KV + audit)"]
        let rows = policies.flatMap { p in
            p.workers.map { w in
                let accounted = Double(w.peakKVBytes) + Double(w.peakAuditBytes)
                let ratio = accounted > 0 ? decimal(Double(w.peakRSSBytes) / accounted, 2) : "—"
                return [p.policy, w.id, mib(w.peakKVBytes), mib(w.peakRSSBytes), mib(w.peakAuditBytes), ratio]
            }
        }
        return table(header: header, rows: rows, textColumns: 2)
    }

    /// Percentiles on a "nines" axis (HdrHistogram style): 90 % is 1, 99 % is 2, 99.9 % is 3.
    static func latencyChart(_ policies: [PolicyResult]) -> String {
        let series = policies.enumerated().map { i, p in
            ChartSeries(
                name: p.policy,
                color: palette[i % palette.count],
                points: p.decodeLatencyPercentiles.sorted { $0.percentile < $1.percentile }.map {
                    ChartPoint(x: nines($0.percentile), y: Double($0.micros) / 1000)
                }
            )
        }
        let maxNines = series.flatMap(\.points).map(\.x).filter(\.isFinite).max() ?? 0
        // Slack so that 99.9 % (2.9999…) does not add an empty decade.
        let ticks = (0...max(2, Int((maxNines - 1e-9).rounded(.up)))).map { k in
            Tick(
                value: Double(k),
                label: k == 0 ? "0" : k == 1 ? "90" : "99" + (k > 2 ? "." + String(repeating: "9", count: k - 2) : "")
            )
        }
        return chart(
            title: "Decode-step latency by percentile",
            x: ChartAxis(label: "percentile (%)", ticks: ticks),
            y: ChartAxis(label: "ms"),
            series: series
        )
    }

    static func nines(_ percentile: Double) -> Double {
        // 100 % would be infinitely far right; show it at six nines.
        let fraction = min(max(percentile / 100, 0), 0.999_999)
        return -log10(1 - fraction)
    }

    /// K/V and RSS per worker, then bytes per modality summed over workers.
    static func footprintCharts(_ samples: [FootprintSample]) -> String {
        let workers = Set(samples.map(\.worker)).sorted()
        var perWorker: [ChartSeries] = []
        for (i, worker) in workers.enumerated() {
            let own = samples.filter { $0.worker == worker }.sorted { $0.elapsedMillis < $1.elapsedMillis }
            let color = palette[i % palette.count]
            perWorker.append(ChartSeries(name: "\(worker) KV", color: color, points: own.map { point($0, $0.kvBytes) }))
            perWorker.append(
                ChartSeries(
                    name: "\(worker) RSS",
                    color: color,
                    points: own.map { point($0, $0.rssBytes) },
                    style: .dashed
                )
            )
        }
        let totals = footprintTotals(samples)
        // Stacked: each band's top is the running sum; drawn top band first so lower ones cover it.
        let stacked = [
            ChartSeries(
                name: "video",
                color: "#59a14f",
                points: totals.map { ChartPoint(x: $0.x, y: $0.text + $0.image + $0.video) },
                style: .area
            ),
            ChartSeries(
                name: "image",
                color: "#f28e2b",
                points: totals.map { ChartPoint(x: $0.x, y: $0.text + $0.image) },
                style: .area
            ),
            ChartSeries(
                name: "text",
                color: "#4e79a7",
                points: totals.map { ChartPoint(x: $0.x, y: $0.text) },
                style: .area
            ),
        ]
        return chart(
            title: "Accounted K/V (solid) and RSS (dashed) per worker",
            x: ChartAxis(label: "seconds"),
            y: ChartAxis(label: "MiB"),
            series: perWorker
        )
            + chart(
                title: "K/V bytes by modality, all workers",
                x: ChartAxis(label: "seconds"),
                y: ChartAxis(label: "MiB"),
                series: samples.isEmpty ? [] : stacked
            )
    }

    static func point(_ sample: FootprintSample, _ bytes: UInt64) -> ChartPoint {
        ChartPoint(x: Double(sample.elapsedMillis) / 1000, y: Double(bytes) / mebibyte)
    }

    struct FootprintTotal {
        var x: Double
        var kv: Double
        var text: Double
        var image: Double
        var video: Double
    }

    /// MiB in all and per modality over all workers at each sample time (x in seconds). Workers are
    /// not sampled at the same instant, so each worker's last sample is carried forward rather than
    /// summing only equal times.
    static func footprintTotals(_ samples: [FootprintSample]) -> [FootprintTotal] {
        let sorted = samples.sorted { $0.elapsedMillis < $1.elapsedMillis }
        var latest: [String: FootprintSample] = [:]
        var totals: [FootprintTotal] = []
        var i = 0
        while i < sorted.count {
            let t = sorted[i].elapsedMillis
            while i < sorted.count && sorted[i].elapsedMillis == t {
                latest[sorted[i].worker] = sorted[i]
                i += 1
            }
            func sum(_ bytes: (FootprintSample) -> UInt64) -> Double {
                latest.values.reduce(0) { $0 + Double(bytes($1)) } / mebibyte
            }
            totals.append(
                FootprintTotal(
                    x: Double(t) / 1000,
                    kv: sum(\.kvBytes),
                    text: sum(\.textBytes),
                    image: sum(\.imageBytes),
                    video: sum(\.videoBytes)
                )
            )
        }
        return totals
    }

    /// The report's policies in order, then any that only the samples name.
    static func policyNames(_ report: BenchReport, _ samples: [FootprintSample]) -> [String] {
        var names = report.policies.map(\.policy)
        for sample in samples where !names.contains(sample.policy) {
            names.append(sample.policy)
        }
        return names
    }

    // MARK: Chart

    struct ChartPoint {
        var x: Double
        var y: Double
    }

    struct ChartSeries {
        enum Style { case line, dashed, area }
        var name: String
        var color: String
        /// In ascending x.
        var points: [ChartPoint]
        var style: Style = .line
    }

    struct Tick {
        var value: Double
        var label: String
    }

    struct ChartAxis {
        var label: String
        /// Fixed ticks; nil picks about five round ones that cover the data.
        var ticks: [Tick]? = nil
    }

    /// An axis from 0 (or the data's minimum, if negative) to the data's maximum, never empty.
    struct AxisScale {
        var lo: Double
        var hi: Double
        var ticks: [Tick]

        init(values: [Double], axis: ChartAxis) {
            lo = min(0, values.min() ?? 0)
            hi = max(values.max() ?? 0, axis.ticks?.map(\.value).max() ?? 0)
            if !(hi > lo) { hi = lo + 1 }  // no data, one point or all zeros
            if let fixed = axis.ticks {
                ticks = fixed
                return
            }
            let step = HTMLReport.niceStep((hi - lo) / 5)
            let first = Int((lo / step).rounded(.down))
            let last = Int((hi / step).rounded(.up))
            lo = Double(first) * step
            hi = Double(last) * step
            let digits = step >= 1 ? 0 : Int((-log10(step)).rounded(.up))
            ticks = (first...last).map {
                Tick(value: Double($0) * step, label: HTMLReport.decimal(Double($0) * step, digits))
            }
        }

        /// Position of `value` from 0 (lo) to `length` (hi).
        func scale(_ value: Double, to length: Double) -> Double {
            (value - lo) / (hi - lo) * length
        }
    }

    /// 1, 2 or 5 times a power of ten, at least `raw`.
    static func niceStep(_ raw: Double) -> Double {
        guard raw.isFinite, raw > 0 else { return 1 }
        let power = pow(10, log10(raw).rounded(.down))
        let mantissa = raw / power
        return power * (mantissa <= 1 ? 1 : mantissa <= 2 ? 2 : mantissa <= 5 ? 5 : 10)
    }

    /// One SVG line chart (paths with scaled axes, ticks, grid and legend); every chart uses it.
    static func chart(title: String, x xAxis: ChartAxis, y yAxis: ChartAxis, series: [ChartSeries]) -> String {
        let (left, right, top, bottom, width, legendRow) = (64.0, 580.0, 32.0, 252.0, 780.0, 18.0)
        let height = max(bottom + 44, top + legendRow * Double(series.count) + 8)
        let series = series.map { s in
            var s = s
            s.points = s.points.filter { $0.x.isFinite && $0.y.isFinite }
            return s
        }
        let points = series.flatMap(\.points)
        let xs = AxisScale(values: points.map(\.x), axis: xAxis)
        let ys = AxisScale(values: points.map(\.y), axis: yAxis)
        func n(_ value: Double) -> String { decimal(value, 1) }
        func px(_ x: Double) -> String { n(left + xs.scale(x, to: right - left)) }
        func py(_ y: Double) -> String { n(bottom - ys.scale(y, to: bottom - top)) }
        let dash = "6 4"

        var svg = "<svg width=\"\(n(width))\" height=\"\(n(height))\" role=\"img\" aria-label=\"\(escape(title))\">\n"
        svg += element("text", ["x": n(left), "y": "18", "font-size": "13", "font-weight": "bold"], text: title)
        for tick in ys.ticks {
            let y = py(tick.value)
            svg += element("line", ["x1": n(left), "x2": n(right), "y1": y, "y2": y, "stroke": "#e5e5e5"])
            svg += element("text", ["x": n(left - 6), "y": y, "dy": "4", "text-anchor": "end"], text: tick.label)
        }
        for tick in xs.ticks {
            let x = px(tick.value)
            svg += element("line", ["x1": x, "x2": x, "y1": n(bottom), "y2": n(bottom + 5), "stroke": "#444"])
            svg += element("text", ["x": x, "y": n(bottom + 18), "text-anchor": "middle"], text: tick.label)
        }
        svg += element(
            "path",
            ["d": "M\(n(left)),\(n(top)) V\(n(bottom)) H\(n(right))", "fill": "none", "stroke": "#444"]
        )
        svg += element(
            "text",
            ["x": n((left + right) / 2), "y": n(bottom + 36), "text-anchor": "middle"],
            text: xAxis.label
        )
        svg += element(
            "text",
            ["transform": "translate(16 \(n((top + bottom) / 2))) rotate(-90)", "text-anchor": "middle"],
            text: yAxis.label
        )
        if points.isEmpty {
            svg += element(
                "text",
                ["x": n((left + right) / 2), "y": n((top + bottom) / 2), "text-anchor": "middle", "fill": "#888"],
                text: "no samples"
            )
        }
        for s in series where !s.points.isEmpty {
            let line = s.points.enumerated().map { i, p in "\(i == 0 ? "M" : "L")\(px(p.x)),\(py(p.y))" }
            switch s.style {
            case .line:
                svg += element(
                    "path",
                    ["d": line.joined(separator: " "), "fill": "none", "stroke": s.color, "stroke-width": "1.5"]
                )
            case .dashed:
                svg += element(
                    "path",
                    [
                        "d": line.joined(separator: " "), "fill": "none", "stroke": s.color, "stroke-width": "1.5",
                        "stroke-dasharray": dash,
                    ]
                )
            case .area:
                // Close the line down to the zero baseline.
                let base = py(max(ys.lo, 0))
                let area = line + ["L\(px(s.points[s.points.count - 1].x)),\(base)", "L\(px(s.points[0].x)),\(base) Z"]
                svg += element("path", ["d": area.joined(separator: " "), "fill": s.color, "stroke": s.color])
            }
            if s.points.count == 1 {  // a lone point draws no line
                svg += element("circle", ["cx": px(s.points[0].x), "cy": py(s.points[0].y), "r": "3", "fill": s.color])
            }
        }
        for (i, s) in series.enumerated() {
            let (x, y) = (right + 16, top + legendRow * Double(i))
            switch s.style {
            case .line, .dashed:
                svg += element(
                    "line",
                    [
                        "x1": n(x), "x2": n(x + 20), "y1": n(y), "y2": n(y), "stroke": s.color, "stroke-width": "2",
                        "stroke-dasharray": s.style == .dashed ? dash : "none",
                    ]
                )
            case .area:
                svg += element("rect", ["x": n(x), "y": n(y - 5), "width": "20", "height": "10", "fill": s.color])
            }
            svg += element("text", ["x": n(x + 26), "y": n(y), "dy": "4"], text: s.name)
        }
        return svg + "</svg>\n"
    }

    /// One SVG element on its own line, with its attribute values and text escaped.
    static func element(_ name: String, _ attributes: KeyValuePairs<String, String>, text: String? = nil) -> String {
        let attributes = attributes.map { " \($0.key)=\"\(escape($0.value))\"" }.joined()
        guard let text else { return "<\(name)\(attributes)/>\n" }
        return "<\(name)\(attributes)>\(escape(text))</\(name)>\n"
    }

    // MARK: Text

    /// Cells are plain text (escaped here); the first `textColumns` are left-aligned, the rest are numbers.
    static func table(header: [String], rows: [[String]], textColumns: Int) -> String {
        func cells(_ values: [String], tag: String) -> String {
            values.enumerated().map { i, v in
                "<\(tag)\(i < textColumns ? " class=\"t\"" : "")>\(escape(v))</\(tag)>"
            }.joined()
        }
        var html = "<table>\n<tr>\(cells(header, tag: "th"))</tr>\n"
        for row in rows {
            html += "<tr>\(cells(row, tag: "td"))</tr>\n"
        }
        return html + "</table>\n"
    }

    static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for c in text {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.append(c)
            }
        }
        return out
    }

    static func mib(_ bytes: UInt64) -> String { decimal(Double(bytes) / mebibyte, 1) }

    static func millis(_ micros: UInt64) -> String { decimal(Double(micros) / 1000, 2) }

    /// `value` with `digits` decimals, or "—" if not finite, so no NaN or inf ever reaches the page.
    /// (Foundation's `String(format:)` is not in FoundationEssentials.)
    static func decimal(_ value: Double, _ digits: Int) -> String {
        guard value.isFinite else { return "—" }
        var unit: UInt64 = 1
        for _ in 0..<digits { unit *= 10 }
        let scaled = (abs(value) * Double(unit)).rounded()
        guard scaled < 1e18 else { return String(value) }  // far beyond any byte count or latency
        let n = UInt64(scaled)
        var text = String(n / unit)
        if digits > 0 {
            let fraction = String(n % unit)
            text += "." + String(repeating: "0", count: digits - fraction.count) + fraction
        }
        return (value < 0 && n != 0 ? "-" : "") + text
    }

    /// Up to two decimals, without trailing zeros (for the header's load).
    static func trimmed(_ value: Double) -> String {
        var text = decimal(value, 2)
        guard text.contains(".") else { return text }
        while text.hasSuffix("0") { text.removeLast() }
        if text.hasSuffix(".") { text.removeLast() }
        return text
    }
}

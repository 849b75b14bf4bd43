import ClusterAdmin
import Foundation
import Testing

/// The Grafana dashboard in `deploy/grafana/` is JSON Grafana can import, and it charts the metrics
/// the processes export: a renamed metric, or a new one left off the dashboard, fails here.
struct DashboardTests {
    static let path = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("deploy/grafana/tessera.json")

    /// The dashboard's panels, and the metric names its queries use (histogram series counted under
    /// their histogram's name).
    static func load() throws -> (panels: [[String: Any]], metrics: Set<String>) {
        let root = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: path)) as? [String: Any])
        let panels = try #require(root["panels"] as? [[String: Any]])
        let name = try Regex(#"\b(?:tessera|process)_[a-z_]+\b"#)
        var metrics: Set<String> = []
        for panel in panels {
            for target in panel["targets"] as? [[String: Any]] ?? [] {
                let expression = try #require(target["expr"] as? String)
                for match in expression.matches(of: name) {
                    var metric = String(expression[match.range])
                    for suffix in ["_bucket", "_sum", "_count"] where metric.hasSuffix(suffix) {
                        metric.removeLast(suffix.count)
                    }
                    metrics.insert(metric)
                }
            }
        }
        return (panels, metrics)
    }

    @Test func everyQueryNamesAnExportedMetricAndEveryMetricIsCharted() throws {
        let (_, charted) = try Self.load()
        let exported = Set(TesseraMetrics.all.map(\.name) + ProcessMetrics.names)
        #expect(charted.subtracting(exported).isEmpty, "queries name metrics nothing exports")
        #expect(exported.subtracting(charted).isEmpty, "exported metrics the dashboard does not chart")
    }

    @Test func panelsHaveUniqueIDsPlacesAndAPrometheusSource() throws {
        let (panels, _) = try Self.load()
        let ids = panels.compactMap { $0["id"] as? Int }
        #expect(ids.count == panels.count && Set(ids).count == ids.count)
        for panel in panels {
            let title = panel["title"] as? String ?? "?"
            let place = try #require(panel["gridPos"] as? [String: Int], "panel \(title) has no gridPos")
            #expect((place["x"] ?? -1) >= 0 && (place["x"] ?? 0) + (place["w"] ?? 0) <= 24, "panel \(title)")
            guard panel["type"] as? String != "row" else { continue }
            let source = panel["datasource"] as? [String: String]
            #expect(source?["type"] == "prometheus", "panel \(title)")
            #expect(!(panel["targets"] as? [[String: Any]] ?? []).isEmpty, "panel \(title) has no query")
        }
    }
}

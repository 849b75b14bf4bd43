package import Metrics
import Synchronization

/// swift-metrics handles made once per label set and then reused. Making a handle asks the factory
/// each time: with Prometheus, a lock, a check of the name and a registry lookup, which per request
/// was 1.3% of the busy CPU samples while a worker took small one-layer sequences. A handle is bound
/// to the factory in effect when it is first made (the process's, or a test's `withMetricsFactory`).
package final class MetricHandles: Sendable {
    private struct Key: Hashable {
        var label: String
        var dimensions: [String]

        init(_ label: String, _ dimensions: [(String, String)]) {
            self.label = label
            self.dimensions = dimensions.flatMap { [$0.0, $0.1] }
        }
    }

    private let counters = Mutex<[Key: Counter]>([:])
    private let timers = Mutex<[Key: Metrics.Timer]>([:])

    package init() {}

    package func counter(_ label: String, dimensions: [(String, String)] = []) -> Counter {
        Self.kept(in: counters, Key(label, dimensions)) { Counter(label: label, dimensions: dimensions) }
    }

    package func timer(_ label: String, dimensions: [(String, String)] = []) -> Metrics.Timer {
        Self.kept(in: timers, Key(label, dimensions)) { Metrics.Timer(label: label, dimensions: dimensions) }
    }

    /// The handle kept under `key`, made by `make` the first time.
    private static func kept<Handle>(
        in table: borrowing Mutex<[Key: Handle]>,
        _ key: Key,
        make: () -> Handle
    ) -> Handle {
        table.withLock { made in
            if let handle = made[key] { return handle }
            let handle = make()
            made[key] = handle
            return handle
        }
    }
}

package import Metrics
import Synchronization

/// swift-metrics handles made once per label set and then reused. Making a handle asks the factory
/// each time: with Prometheus, a lock, a check of the name and a registry lookup, which per request
/// came to about 4% of a worker's CPU on small frames. A handle is bound to the factory in effect
/// when it is first made (the process's, or a test's `withMetricsFactory`).
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
        counters.withLock { made in
            let key = Key(label, dimensions)
            if let counter = made[key] { return counter }
            let counter = Counter(label: label, dimensions: dimensions)
            made[key] = counter
            return counter
        }
    }

    package func timer(_ label: String, dimensions: [(String, String)] = []) -> Metrics.Timer {
        timers.withLock { made in
            let key = Key(label, dimensions)
            if let timer = made[key] { return timer }
            let timer = Metrics.Timer(label: label, dimensions: dimensions)
            made[key] = timer
            return timer
        }
    }
}

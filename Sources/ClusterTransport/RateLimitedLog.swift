package import Logging
import Synchronization

/// Logs a repeated event once per interval and key, with how many were left out in between, so that a
/// peer sending the same bad input thousands of times a second cannot flood the log.
package final class RateLimitedLog: Sendable {
    private struct Entry {
        var last: ContinuousClock.Instant
        var suppressed: Int
    }

    private let interval: Duration
    private let entries = Mutex<[String: Entry]>([:])

    package init(interval: Duration = .seconds(10)) { self.interval = interval }

    /// Logs `message` at warning level unless the same `key` was logged within the interval.
    package func warning(
        _ key: String,
        _ message: @autoclosure () -> Logger.Message,
        metadata: Logger.Metadata,
        logger: Logger
    ) {
        let now = ContinuousClock.now
        let suppressed: Int? = entries.withLock { entries in
            if var entry = entries[key], now - entry.last < interval {
                entry.suppressed += 1
                entries[key] = entry
                return nil
            }
            defer { entries[key] = Entry(last: now, suppressed: 0) }
            return entries[key]?.suppressed ?? 0
        }
        guard let suppressed else { return }
        var metadata = metadata
        if suppressed > 0 { metadata["suppressed"] = "\(suppressed)" }
        logger.warning(message(), metadata: metadata)
    }
}

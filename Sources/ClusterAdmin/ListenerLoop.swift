public import NIOCore

extension NIOAsyncChannel where Outbound == Never, Inbound: Sendable {
    /// Hands every accepted connection to `serve` (each in its own child task) until the calling task
    /// is cancelled; then closes the listener, serves what it had already accepted, cancels the
    /// connections and returns.
    ///
    /// The accept loop is not cancelled directly: cancelling the iteration of a listener's inbound
    /// stream drops the connections buffered in it, and an accepted `NIOAsyncChannel` dropped without
    /// `executeThenClose` traps ("Deinited NIOAsyncWriter without calling finish()",
    /// apple/swift-nio#2813). Closing the listener instead ends the stream after its buffered
    /// elements, each of which then gets served (and closed).
    public func serveUntilCancelled(_ serve: @escaping @Sendable (Inbound) async -> Void) async throws {
        let listener = self
        try await withTaskCancellationHandler {
            // An unstructured task, so that the caller's cancellation does not reach the accept loop.
            try await Task {
                try await withThrowingDiscardingTaskGroup { group in
                    try await listener.executeThenClose { inbound in
                        for try await connection in inbound {
                            group.addTask { await serve(connection) }
                        }
                    }
                    group.cancelAll()
                }
            }.value
        } onCancel: {
            listener.channel.close(promise: nil)
        }
    }
}

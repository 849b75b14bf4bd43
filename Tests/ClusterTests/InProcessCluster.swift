import ClusterSecurity
import ClusterState
import ClusterTransport
import ClusterWire
import Coordinator
import KVCacheCore
import Logging
import Testing
import Worker

/// A coordinator and `count` workers as services in this process, on port 0, with `certificates`'
/// identities (workers `prefix-1`, `prefix-2`, …). `body` gets the coordinator's address and the
/// workers; every service stops when it returns.
func withInProcessCluster(
    _ certificates: CertificateDirectory,
    workers count: Int,
    named prefix: String,
    storage: ScalarType = .float32,
    failureDetector: FailureDetectorSettings = .defaults,
    logger: Logger,
    _ body: @Sendable (NodeAddress, [WorkerService]) async throws -> Void
) async throws {
    let ports = AsyncStream.makeStream(of: Int.self)
    let coordinator = try CoordinatorService(
        configuration: CoordinatorConfiguration(
            incarnation: 1,
            listen: NodeAddress(host: "127.0.0.1", port: 0),
            security: try certificates.security(.coordinator, "coordinator"),
            failureDetector: failureDetector,
            startsNewCluster: true
        ),
        logger: logger
    )
    try await withThrowingTaskGroup(of: Void.self) { group in
        defer { group.cancelAll() }
        group.addTask { try await coordinator.run { ports.continuation.yield($0) } }
        var iterator = ports.stream.makeAsyncIterator()
        let address = NodeAddress(host: "127.0.0.1", port: try #require(await iterator.next()))
        var workers: [WorkerService] = []
        for index in 1...count {
            let worker = WorkerService(
                configuration: WorkerConfiguration(
                    nodeID: "\(prefix)-\(index)",
                    incarnation: 1,
                    listen: NodeAddress(host: "127.0.0.1", port: 0),
                    coordinator: address,
                    security: try certificates.security(.worker, "\(prefix)-\(index)"),
                    storage: storage
                ),
                logger: logger
            )
            workers.append(worker)
            group.addTask { try await worker.run() }
        }
        try await body(address, workers)
    }
}

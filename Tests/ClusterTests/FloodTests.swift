import ClusterLauncher
import ClusterTransport
import ClusterWire
import Logging
import NIOCore
import Synchronization
import Testing

/// A flood of client requests on every port of a cluster does not get a healthy worker declared dead.
/// Heartbeats travel on each worker's own connection to the coordinator, and each flooding
/// connection is read only as fast as it is served (its requests in flight are capped), so the
/// flood takes CPU but never queues ahead of a heartbeat without bound.
@Suite struct FloodTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    /// Connections per port, each keeping `window` requests in flight.
    static let connections = 32
    static let window = 64

    /// Keeps `window` status requests in flight on one raw connection until `deadline`; returns how
    /// many were answered.
    static func flood(port: Int, clientID: String, until deadline: ContinuousClock.Instant) async throws -> Int {
        try await TransportLimitsTests.raw(port) { inbound, outbound in
            let hello = Handshake(local: NodeIdentity(role: .client, nodeID: clientID, incarnation: 1)).hello()
            try await outbound.write(hello)
            var frames = inbound.makeAsyncIterator()
            guard try await frames.next()?.bodyName == "hello_ack" else { return 0 }
            var answered = 0
            var requestID: UInt64 = 1
            while ContinuousClock.now < deadline {
                for _ in 0..<window {
                    try await outbound.write(Tessera_V1_Envelope(requestID: requestID, .statusRequest(.init())))
                    requestID += 2
                }
                for _ in 0..<window {
                    guard try await frames.next()?.bodyName == "status_reply" else { return answered }
                    answered += 1
                }
            }
            return answered
        }
    }

    /// Each worker's incarnation and state as the coordinator sees them.
    static func members(_ coordinator: NodeAddress) async throws -> [String: String] {
        try await TransportLimitsTests.raw(coordinator.port) { inbound, outbound in
            let hello = Handshake(local: NodeIdentity(role: .client, nodeID: "observer", incarnation: 1)).hello()
            try await outbound.write(hello)
            var frames = inbound.makeAsyncIterator()
            _ = try await frames.next()
            try await outbound.write(Tessera_V1_Envelope(requestID: 1, .statusRequest(.init())))
            guard case .statusReply(let reply) = try await frames.next()?.body else { return [:] }
            return Dictionary(
                uniqueKeysWithValues: reply.workers.map {
                    ($0.endpoint.nodeID, "incarnation \($0.incarnation) \($0.state)")
                }
            )
        }
    }

    @Test(.timeLimit(.minutes(3)))
    func aFloodOfClientRequestsGetsNoHealthyWorkerDeclaredDead() async throws {
        var options = LocalCluster.Options(
            binary: LocalCluster.siblingBinary,
            workers: 2,
            childArguments: ["--log-level", "error"]
        )
        options.security = .insecure
        try await LocalCluster.withCluster(options, logger: Self.logger) { cluster in
            let before = try await Self.members(cluster.coordinator)
            #expect(before.count == 2 && before.values.allSatisfy { $0.hasSuffix("up") }, "\(before)")
            // Longer than twice the failure detector's dead-after time (3 s).
            let deadline = ContinuousClock.now + .seconds(8)
            let ports = [cluster.coordinator.port] + cluster.workers.map(\.address.port)
            let answered = try await withThrowingTaskGroup(of: Int.self) { group in
                for port in ports {
                    for index in 0..<Self.connections {
                        group.addTask {
                            try await Self.flood(port: port, clientID: "flood-\(port)-\(index)", until: deadline)
                        }
                    }
                }
                return try await group.reduce(0, +)
            }
            // The flood really ran: thousands of requests answered on every port together.
            #expect(answered > 2 * ports.count * Self.connections * Self.window, "answered \(answered)")
            let after = try await Self.members(cluster.coordinator)
            #expect(after == before, "a worker was declared dead during the flood: \(before) became \(after)")
        }
    }
}

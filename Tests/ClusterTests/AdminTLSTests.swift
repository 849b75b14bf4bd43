import ClusterAdmin
import ClusterSecurity
import ClusterWire
import NIOCore
import NIOPosix
import NIOSSL
import Prometheus
import Testing

/// The admin endpoint over HTTPS (`--admin-tls`): a client that trusts the cluster CA reads it; a
/// plain-HTTP request to the same port gets no answer, and neither does a client trusting another CA.
struct AdminTLSTests {
    @Test(.timeLimit(.minutes(1)))
    func theAdminEndpointServesHTTPSWithTheNodesCertificate() async throws {
        try await withTestCertificates { folder in
            guard case .mutualTLS(let credentials) = try folder.security(.worker, "worker-1") else {
                Issue.record("no credentials")
                return
            }
            let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
            let server = AdminServer(
                host: "127.0.0.1",
                port: 0,
                registry: PrometheusCollectorRegistry(),
                tls: AdminServer.TLS { credentials.adminServerHandler() }
            ) { port in
                continuation.yield(port)
                continuation.finish()
            }
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await server.run() }
                defer { group.cancelAll() }
                var iterator = ports.makeAsyncIterator()
                let port = try #require(await iterator.next())
                let answer = try await Self.get("/healthz", port: port, trusting: folder.caCertificate)
                #expect(answer.hasPrefix("HTTP/1.1 200") && answer.contains("\r\n\r\nok"), "\(answer)")
                // Plain HTTP to the TLS port: the server reads it as a broken handshake.
                let plain = try? await Self.get("/healthz", port: port, trusting: nil)
                #expect(plain.map { !$0.contains("200") } ?? true, "\(plain ?? "")")
                // A client trusting another CA refuses the node's certificate.
                _ = try await withTestCertificates { other in
                    await #expect(throws: (any Error).self) {
                        _ = try await Self.get("/healthz", port: port, trusting: other.caCertificate)
                    }
                }
            }
        }
    }

    /// `GET path` over TLS trusting the CA in `caFile` (no host name check: nodes are named by their
    /// certificates' subjects), or over plain TCP with `caFile` nil; the whole raw answer.
    static func get(_ path: String, port: Int, trusting caFile: String?) async throws -> String {
        let context = try caFile.map { file in
            var configuration = TLSConfiguration.makeClientConfiguration()
            configuration.trustRoots = .file(file)
            configuration.certificateVerification = .noHostnameVerification
            return try NIOSSLContext(configuration: configuration)
        }
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let context {
                        try channel.pipeline.syncOperations.addHandler(
                            try NIOSSLClientHandler(context: context, serverHostname: nil)
                        )
                    }
                    return try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        return try await channel.executeThenClose { inbound, outbound in
            try await outbound.write(ByteBuffer(string: "GET \(path) HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
            var received = ByteBuffer()
            for try await var chunk in inbound { received.writeBuffer(&chunk) }
            return String(buffer: received)
        }
    }
}

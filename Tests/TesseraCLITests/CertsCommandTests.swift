import FoundationEssentials
import Subprocess
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite struct CertsCommandTests {
    /// A process whose own certificate was revoked refuses to start, naming the serial, instead of
    /// starting and being refused by every peer.
    @Test(.timeLimit(.minutes(1)))
    func aProcessWithARevokedCertificateRefusesToStart() async throws {
        var template = Array("/tmp/tessera-certs-XXXXXX".utf8CString)
        let directory = try #require(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) })
            .withMemoryRebound(to: UInt8.self, capacity: template.count) { String(cString: $0) }
        defer { try? FileManager.default.removeItem(atPath: directory) }
        for arguments in [
            ["certs", "init", "--dir", directory],
            ["certs", "issue", "--dir", directory, "--role", "worker", "--name", "worker-1"],
            ["certs", "revoke", "--dir", directory, "--name", "worker-1"],
        ] {
            let result = try await runTessera(arguments)
            #expect(result.status == .exited(0), "\(arguments): \(result.stderr)")
        }
        let worker = try await runTessera([
            "worker", "--certs", directory, "--node-id", "worker-1", "--coordinator", "127.0.0.1:1",
        ])
        #expect(worker.status == .exited(64), "\(worker.stderr)")
        #expect(
            worker.stderr.contains("worker-1") && worker.stderr.contains("is on the revocation list"),
            "\(worker.stderr)"
        )
    }
}

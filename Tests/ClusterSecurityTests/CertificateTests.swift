import ClusterSecurity
import ClusterWire
import FoundationEssentials
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Certificates carry exactly the identity they were issued for, and nothing a process cannot use.
@Suite struct CertificateTests {
    static func withFolder(_ body: (CertificateDirectory) throws -> Void) throws {
        var template = Array("/tmp/tessera-certificate-tests-XXXXXX".utf8CString)
        let folder = CertificateDirectory(String(cString: try #require(mkdtemp(&template))))
        defer { try? FileManager.default.removeItem(atPath: folder.path) }
        try body(folder)
    }

    @Test func anIssuedCertificateNamesItsRoleNodeAndTenant() throws {
        try Self.withFolder { folder in
            try CertificateAuthority.create().write(to: folder)
            #expect(folder.hasAuthority)
            for identity in [
                CertifiedIdentity(role: .coordinator, nodeID: "coordinator"),
                CertifiedIdentity(role: .worker, nodeID: "worker-7"),
                CertifiedIdentity(role: .client, nodeID: "alice-laptop", tenant: "alice"),
            ] {
                let certificate = try CertificateAuthority.load(from: folder).issue(identity, into: folder)
                #expect(try CertifiedIdentity(certificate: certificate) == identity)
                #expect(try NodeCredentials(directory: folder, name: identity.nodeID).identity == identity)
            }
            // Keys are readable by their owner only.
            var info = stat()
            #expect(stat(folder.key("worker-7"), &info) == 0 && info.st_mode & 0o077 == 0)
            #expect(stat(folder.caKey, &info) == 0 && info.st_mode & 0o077 == 0)
        }
    }

    @Test func aClientNeedsATenantAndOtherRolesHaveNone() throws {
        try Self.withFolder { folder in
            try CertificateAuthority.create().write(to: folder)
            let authority = try CertificateAuthority.load(from: folder)
            #expect(throws: CertificateError.self) {
                try authority.issue(CertifiedIdentity(role: .client, nodeID: "anonymous"), into: folder)
            }
            #expect(throws: CertificateError.self) {
                try authority.issue(CertifiedIdentity(role: .worker, nodeID: "worker-1", tenant: "alice"), into: folder)
            }
            #expect(throws: CertificateError.self) {
                try authority.issue(CertifiedIdentity(role: .worker, nodeID: "../etc/passwd"), into: folder)
            }
        }
    }

    @Test func credentialsAreReusedOrReissuedForAnotherIdentity() throws {
        try Self.withFolder { folder in
            try CertificateAuthority.create().write(to: folder)
            let bench = CertifiedIdentity(role: .client, nodeID: "bench", tenant: "bench")
            _ = try folder.credentials(for: bench)
            let first = try #require(FileManager.default.contents(atPath: folder.certificate("bench")))
            _ = try folder.credentials(for: bench)
            #expect(FileManager.default.contents(atPath: folder.certificate("bench")) == first)
            // The same name for another tenant is a new certificate.
            let moved = CertifiedIdentity(role: .client, nodeID: "bench", tenant: "other")
            #expect(try folder.credentials(for: moved).identity == moved)
            #expect(FileManager.default.contents(atPath: folder.certificate("bench")) != first)
            // Without the CA key nothing new can be issued, and the error says what is missing.
            try FileManager.default.removeItem(atPath: folder.caKey)
            #expect {
                try folder.credentials(for: CertifiedIdentity(role: .worker, nodeID: "worker-9"))
            } throws: { "\($0)".contains("no CA key") }
        }
    }

    @Test func aProcessRunsOnlyAsTheNodeItsCertificateNames() throws {
        try Self.withFolder { folder in
            try CertificateAuthority.create().write(to: folder)
            let security = TransportSecurity.mutualTLS(
                try folder.credentials(for: CertifiedIdentity(role: .worker, nodeID: "worker-1"))
            )
            try security.check(local: NodeIdentity(role: .worker, nodeID: "worker-1", incarnation: 3))
            #expect(throws: CertificateError.self) {
                try security.check(local: NodeIdentity(role: .worker, nodeID: "worker-2", incarnation: 3))
            }
            #expect(throws: CertificateError.self) {
                try security.check(local: NodeIdentity(role: .coordinator, nodeID: "worker-1", incarnation: 3))
            }
            try TransportSecurity.insecure.check(local: NodeIdentity(role: .coordinator, nodeID: "any", incarnation: 1))
        }
    }

    @Test func aMissingFileIsNamedInTheError() throws {
        try Self.withFolder { folder in
            #expect {
                try NodeCredentials(directory: folder, name: "worker-1")
            } throws: { "\($0)".contains(folder.certificate("worker-1")) && "\($0)".contains("tessera certs") }
        }
    }
}

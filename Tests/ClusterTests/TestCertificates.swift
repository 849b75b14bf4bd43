import ClusterSecurity
import ClusterWire
import FoundationEssentials

/// A throw-away cluster CA in a temporary folder, deleted when the scope ends.
func withTestCertificates<T>(_ body: (CertificateDirectory) async throws -> T) async throws -> T {
    let folder = CertificateDirectory(try temporaryDirectory("tessera-test-certs"))
    defer { try? FileManager.default.removeItem(atPath: folder.path) }
    try CertificateAuthority.create().write(to: folder)
    return try await body(folder)
}

extension CertificateDirectory {
    /// Mutual TLS as `role` `nodeID` (of `tenant`, for clients), issuing the certificate if needed.
    func security(_ role: NodeRole, _ nodeID: String, tenant: String? = nil) throws -> TransportSecurity {
        .mutualTLS(try credentials(for: CertifiedIdentity(role: role, nodeID: nodeID, tenant: tenant)))
    }
}

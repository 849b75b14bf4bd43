import ClusterSecurity
import ClusterWire
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#endif

/// A throw-away cluster CA in a temporary folder, deleted when the scope ends.
func withTestCertificates<T>(_ body: (CertificateDirectory) async throws -> T) async throws -> T {
    var template = Array("/tmp/tessera-test-certs-XXXXXX".utf8CString)
    guard let path = mkdtemp(&template) else { throw CertificateError("cannot create a temporary folder") }
    let folder = CertificateDirectory(String(cString: path))
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

public import ClusterWire
package import NIOCore
package import NIOSSL
import SwiftASN1
import X509

/// How a process's connections are secured: mutual TLS with the cluster's certificates (the
/// default everywhere), or plaintext, which trusts every role and tenant a peer claims.
public enum TransportSecurity: Sendable {
    case mutualTLS(NodeCredentials)
    case insecure

    /// What this process's own certificate says it is; nil when insecure.
    public var identity: CertifiedIdentity? {
        if case .mutualTLS(let credentials) = self { return credentials.identity }
        return nil
    }

    /// The warning every process logs at start when it runs without TLS.
    public static let insecureWarning =
        "INSECURE: TLS is off (--insecure); any peer can claim any role, node id or tenant. Use only on a trusted host."
}

/// One node's TLS material: the cluster CA as the only trust root, and the node's own certificate
/// and key, whose subject says what the node is.
public struct NodeCredentials: Sendable {
    public let identity: CertifiedIdentity
    private let server: NIOSSLContext
    private let client: NIOSSLContext
    /// The admin endpoint's HTTPS: the node's certificate, no client certificate asked for (scrapers
    /// and operators verify the node against the CA; a change still needs the bearer token).
    private let admin: NIOSSLContext
    private let revocations: RevocationList
    /// This node's own certificate's serial, as the revocation list spells it.
    private let serial: String

    /// Loads `NAME.pem`, `NAME-key.pem` and `ca.pem` from `directory`.
    public init(directory: CertificateDirectory, name: String) throws(CertificateError) {
        let certificatePEM = try directory.read(directory.certificate(name), what: "the certificate of \(name)")
        let keyPEM = try directory.read(directory.key(name), what: "the key of \(name)")
        let caPEM = try directory.read(directory.caCertificate, what: "the CA certificate")
        let certificate: Certificate
        do {
            certificate = try Certificate(pemEncoded: certificatePEM)
        } catch {
            throw CertificateError("cannot parse \(directory.certificate(name)): \(error)")
        }
        identity = try CertifiedIdentity(certificate: certificate)
        revocations = RevocationList(directory)
        serial = certificate.serialNumber.hex
        do {
            let chain = try NIOSSLCertificate.fromPEMBytes(Array(certificatePEM.utf8)).map {
                NIOSSLCertificateSource.certificate($0)
            }
            let key = NIOSSLPrivateKeySource.privateKey(try NIOSSLPrivateKey(bytes: Array(keyPEM.utf8), format: .pem))
            let roots = NIOSSLTrustRoots.certificates(try NIOSSLCertificate.fromPEMBytes(Array(caPEM.utf8)))
            var serverConfiguration = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: key)
            var clientConfiguration = TLSConfiguration.makeClientConfiguration()
            clientConfiguration.certificateChain = chain
            clientConfiguration.privateKey = key
            // Peers are named by their certificates' subjects, not by host names; the CA is the only root,
            // and a client without a certificate is refused during the TLS handshake.
            serverConfiguration.trustRoots = roots
            serverConfiguration.certificateVerification = .noHostnameVerification
            serverConfiguration.minimumTLSVersion = .tlsv13
            clientConfiguration.trustRoots = roots
            clientConfiguration.certificateVerification = .noHostnameVerification
            clientConfiguration.minimumTLSVersion = .tlsv13
            var adminConfiguration = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: key)
            adminConfiguration.minimumTLSVersion = .tlsv12
            server = try NIOSSLContext(configuration: serverConfiguration)
            client = try NIOSSLContext(configuration: clientConfiguration)
            admin = try NIOSSLContext(configuration: adminConfiguration)
        } catch {
            throw CertificateError("cannot load the TLS credentials of \(name) from \(directory): \(error)")
        }
    }

    /// Refuses credentials whose own certificate is on the folder's revocation list: every peer would
    /// refuse them, so a process that started with them could reach nobody.
    public func checkNotRevoked() throws(CertificateError) {
        guard try revocations.contains(serial: serial) else { return }
        throw CertificateError(
            "the certificate of \(identity.nodeID) (serial \(serial)) is on the revocation list; issue a new one "
                + "(tessera certs issue)"
        )
    }

    /// The TLS handler that starts an accepted connection.
    package func serverHandler() -> NIOSSLServerHandler { NIOSSLServerHandler(context: server) }

    /// A TLS handler for one connection to the admin endpoint (HTTPS, server certificate only).
    package func adminServerHandler() -> NIOSSLServerHandler { NIOSSLServerHandler(context: admin) }

    /// The TLS handler that starts a connection this node opens.
    package func clientHandler() throws -> NIOSSLClientHandler {
        try NIOSSLClientHandler(context: client, serverHostname: nil)
    }

    /// What the peer's certificate says, once the TLS handshake is done (the first frame has arrived);
    /// a certificate on the folder's revocation list is refused.
    package func peerCertificate(of channel: any Channel) async throws(WireError) -> PeerCertificate {
        let peer: NIOSSLCertificate?
        do {
            peer = try await channel.nioSSL_peerCertificate().get()
        } catch {
            throw WireError(.permissionDenied, "the peer's certificate cannot be read: \(error)")
        }
        guard let peer else { throw WireError(.permissionDenied, "the peer presented no certificate") }
        let certificate: Certificate
        do {
            certificate = try Certificate(derEncoded: try peer.toDERBytes())
        } catch {
            throw WireError(.permissionDenied, "the peer's certificate cannot be parsed: \(error)")
        }
        let serial = certificate.serialNumber.hex
        do throws(CertificateError) {
            if try revocations.contains(serial: serial) {
                throw CertificateError("is revoked (serial \(serial))")
            }
            return PeerCertificate(
                identity: try CertifiedIdentity(certificate: certificate),
                serial: serial,
                revocations: revocations
            )
        } catch {
            throw WireError(.permissionDenied, "the peer's certificate: \(error.message)")
        }
    }
}

extension TransportSecurity {
    /// Refuses to start a process whose own certificate names another role or node id than it runs as.
    public func check(local: NodeIdentity) throws(CertificateError) {
        guard let identity, identity.role != local.role || identity.nodeID != local.nodeID else { return }
        throw CertificateError(
            "this \(local.role) runs as \(local.nodeID), but its certificate names \(identity.role) \(identity.nodeID)"
        )
    }

    /// The peer's certificate over mutual TLS; nil when insecure.
    package func peerCertificate(of channel: any Channel) async throws(WireError) -> PeerCertificate? {
        guard case .mutualTLS(let credentials) = self else { return nil }
        return try await credentials.peerCertificate(of: channel)
    }
}

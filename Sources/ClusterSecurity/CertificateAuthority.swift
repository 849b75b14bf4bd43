public import ClusterWire
import Crypto
import FoundationEssentials
import SwiftASN1
public import X509

/// A problem with certificate files or their contents; the message names the file and what was expected.
public struct CertificateError: Error, Sendable, CustomStringConvertible {
    public var message: String

    public init(_ message: String) { self.message = message }

    public var description: String { message }
}

/// Where a cluster's certificates live, one folder for all of them:
/// `ca.pem` (the trust root every node loads), `ca-key.pem` (only where certificates are issued),
/// and `NAME.pem` with `NAME-key.pem` for each node or client, NAME being its node id.
public struct CertificateDirectory: Sendable, Hashable, CustomStringConvertible {
    public var path: String

    public init(_ path: String) { self.path = path }

    public var caCertificate: String { "\(path)/ca.pem" }
    public var caKey: String { "\(path)/ca-key.pem" }
    public func certificate(_ name: String) -> String { "\(path)/\(name).pem" }
    public func key(_ name: String) -> String { "\(path)/\(name)-key.pem" }

    public var description: String { path }

    /// Whether the folder holds a CA that can issue certificates.
    public var hasAuthority: Bool {
        FileManager.default.fileExists(atPath: caCertificate) && FileManager.default.fileExists(atPath: caKey)
    }

    func read(_ file: String, what: String) throws(CertificateError) -> String {
        guard let data = FileManager.default.contents(atPath: file), let text = String(data: data, encoding: .utf8)
        else {
            throw CertificateError(
                "cannot read \(what) at \(file) (make one with `tessera certs init` and `tessera certs issue`)"
            )
        }
        return text
    }

    /// Writes a PEM file; keys are readable by their owner only.
    func write(_ text: String, to file: String, secret: Bool) throws(CertificateError) {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw CertificateError("cannot create the certificate folder \(path): \(error)")
        }
        let attributes: [FileAttributeKey: Any] = [.posixPermissions: secret ? 0o600 : 0o644]
        guard FileManager.default.createFile(atPath: file, contents: Data(text.utf8), attributes: attributes) else {
            throw CertificateError("cannot write \(file)")
        }
    }
}

/// A cluster's certificate authority: a P-256 key and a self-signed certificate that every node
/// trusts as its only root. It issues the certificates whose subject binds a node's role, node id
/// and, for clients, tenant (`CertifiedIdentity.subject`).
public struct CertificateAuthority: Sendable {
    public let certificate: Certificate
    private let privateKey: Certificate.PrivateKey

    /// How long a certificate is valid unless asked otherwise.
    public static let defaultValidityDays = 365

    private init(certificate: Certificate, privateKey: Certificate.PrivateKey) {
        self.certificate = certificate
        self.privateKey = privateKey
    }

    /// A new CA, valid for `days` from now.
    public static func create(
        name: String = "Tessera cluster CA",
        days: Int = 10 * 365
    ) throws(CertificateError) -> Self {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        do {
            let subject = try DistinguishedName { CommonName(name) }
            let now = Date()
            let certificate = try Certificate(
                version: .v3,
                serialNumber: Certificate.SerialNumber(),
                publicKey: key.publicKey,
                notValidBefore: now.addingTimeInterval(-300),
                notValidAfter: now.addingTimeInterval(Double(days) * 86_400),
                issuer: subject,
                subject: subject,
                signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try Certificate.Extensions {
                    Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                    Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                    SubjectKeyIdentifier(hash: key.publicKey)
                },
                issuerPrivateKey: key
            )
            return Self(certificate: certificate, privateKey: key)
        } catch {
            throw CertificateError("cannot create a CA certificate: \(error)")
        }
    }

    /// The CA in `directory` (`ca.pem` and `ca-key.pem`).
    public static func load(from directory: CertificateDirectory) throws(CertificateError) -> Self {
        let certificatePEM = try directory.read(directory.caCertificate, what: "the CA certificate")
        let keyPEM = try directory.read(directory.caKey, what: "the CA key")
        do {
            return Self(
                certificate: try Certificate(pemEncoded: certificatePEM),
                privateKey: try Certificate.PrivateKey(pemEncoded: keyPEM)
            )
        } catch {
            throw CertificateError("cannot parse the CA in \(directory): \(error)")
        }
    }

    /// Writes `ca.pem` and `ca-key.pem`.
    public func write(to directory: CertificateDirectory) throws(CertificateError) {
        do {
            try directory.write(certificate.serializeAsPEM().pemString, to: directory.caCertificate, secret: false)
            try directory.write(privateKey.serializeAsPEM().pemString, to: directory.caKey, secret: true)
        } catch let error as CertificateError {
            throw error
        } catch {
            throw CertificateError("cannot encode the CA: \(error)")
        }
    }

    /// A certificate for `identity`, valid for `days`, with a fresh P-256 key; written to
    /// `directory` as `NODE.pem` and `NODE-key.pem`. Returns the certificate.
    @discardableResult
    public func issue(
        _ identity: CertifiedIdentity,
        days: Int = defaultValidityDays,
        into directory: CertificateDirectory
    ) throws(CertificateError) -> Certificate {
        try CertifiedIdentity.validate(identity)
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        do {
            let now = Date()
            let certificate = try Certificate(
                version: .v3,
                serialNumber: Certificate.SerialNumber(),
                publicKey: key.publicKey,
                notValidBefore: now.addingTimeInterval(-300),
                notValidAfter: now.addingTimeInterval(Double(days) * 86_400),
                issuer: self.certificate.subject,
                subject: try identity.subject,
                signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try Certificate.Extensions {
                    Critical(BasicConstraints.notCertificateAuthority)
                    Critical(KeyUsage(digitalSignature: true))
                    try ExtendedKeyUsage([.serverAuth, .clientAuth])
                    SubjectKeyIdentifier(hash: key.publicKey)
                    AuthorityKeyIdentifier(
                        keyIdentifier: SubjectKeyIdentifier(hash: privateKey.publicKey).keyIdentifier
                    )
                },
                issuerPrivateKey: privateKey
            )
            try directory.write(
                certificate.serializeAsPEM().pemString,
                to: directory.certificate(identity.nodeID),
                secret: false
            )
            try directory.write(key.serializeAsPEM().pemString, to: directory.key(identity.nodeID), secret: true)
            return certificate
        } catch let error as CertificateError {
            throw error
        } catch {
            throw CertificateError("cannot issue a certificate for \(identity): \(error)")
        }
    }
}

extension CertifiedIdentity {
    /// The certificate subject that carries this identity: CN = node id, OU = role, O = tenant (clients).
    var subject: DistinguishedName {
        get throws {
            try DistinguishedName {
                if let tenant { OrganizationName(tenant) }
                OrganizationalUnitName(role.rawValue)
                CommonName(nodeID)
            }
        }
    }

    /// The identity a certificate's subject carries; the error says what is missing or not allowed.
    public init(certificate: Certificate) throws(CertificateError) {
        var values: [ASN1ObjectIdentifier: [String]] = [:]
        for name in certificate.subject {
            for attribute in name {
                values[attribute.type, default: []].append(String(describing: attribute.value))
            }
        }
        func single(_ type: ASN1ObjectIdentifier, _ what: String) throws(CertificateError) -> String? {
            let found = values[type] ?? []
            guard found.count <= 1 else {
                throw CertificateError("the certificate names \(found.count) \(what)s; expected one")
            }
            return found.first
        }
        guard let roleName = try single(.RDNAttributeType.organizationalUnitName, "role (OU)"),
            let role = NodeRole(rawValue: roleName)
        else {
            throw CertificateError(
                "the certificate's subject \(certificate.subject) has no role; expected OU=coordinator, OU=worker or OU=client"
            )
        }
        guard let nodeID = try single(.RDNAttributeType.commonName, "node id (CN)") else {
            throw CertificateError("the certificate's subject \(certificate.subject) has no node id (CN)")
        }
        self.init(role: role, nodeID: nodeID, tenant: try single(.RDNAttributeType.organizationName, "tenant (O)"))
        try Self.validate(self)
    }

    /// Clients name exactly one tenant, other roles none; node ids and tenants are short and printable.
    static func validate(_ identity: CertifiedIdentity) throws(CertificateError) {
        let idBytes = identity.nodeID.utf8.count
        guard idBytes > 0, idBytes <= NodeIdentity.maxNodeIDBytes, !identity.nodeID.contains("/") else {
            throw CertificateError(
                "node id '\(identity.nodeID)' must be 1...\(NodeIdentity.maxNodeIDBytes) bytes without '/'"
            )
        }
        switch (identity.role, identity.tenant) {
        case (.client, let tenant?) where !tenant.isEmpty && tenant.utf8.count <= 256: return
        case (.client, _): throw CertificateError("a client certificate must name its tenant (1...256 bytes)")
        case (_, nil): return
        case (let role, _?): throw CertificateError("a \(role) certificate names no tenant")
        }
    }
}

extension CertificateDirectory {
    /// The credentials of `identity`: its certificate in this folder if that names exactly this
    /// identity and is not revoked, otherwise a new one issued by the folder's CA (rotation is issuing
    /// again).
    public func credentials(for identity: CertifiedIdentity) throws(CertificateError) -> NodeCredentials {
        if let existing = try? NodeCredentials(directory: self, name: identity.nodeID), existing.identity == identity,
            (try? existing.checkNotRevoked()) != nil
        {
            return existing
        }
        guard hasAuthority else {
            throw CertificateError(
                "\(path) has no certificate for \(identity) and no CA key to issue one (tessera certs issue)"
            )
        }
        try CertificateAuthority.load(from: self).issue(identity, into: self)
        return try NodeCredentials(directory: self, name: identity.nodeID)
    }
}

public import NIOCore

/// The part a process plays in the cluster (`tessera.v1.NodeRole`).
public enum NodeRole: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    case coordinator
    case worker
    case client

    public var description: String { self.rawValue }

    package var proto: Tessera_V1_NodeRole {
        switch self {
        case .coordinator: .coordinator
        case .worker: .worker
        case .client: .client
        }
    }

    /// `nil` for `UNSPECIFIED` and unknown values.
    package init?(proto: Tessera_V1_NodeRole) {
        switch proto {
        case .coordinator: self = .coordinator
        case .worker: self = .worker
        case .client: self = .client
        case .unspecified, .UNRECOGNIZED: return nil
        }
    }
}

/// Who is on one end of a connection: a role, a node id, and the incarnation that tells one process
/// lifetime of that node from the next.
public struct NodeIdentity: Sendable, Hashable, Codable, CustomStringConvertible {
    /// The longest node id accepted, in UTF-8 bytes.
    public static let maxNodeIDBytes = 256

    public var role: NodeRole
    public var nodeID: String
    public var incarnation: UInt64
    /// The tenant a client's certificate names; nil for other roles and on insecure connections,
    /// where the tenant in each message is taken on trust.
    public var tenant: String?
    /// Whether role and node id were checked against the peer's certificate.
    public var isCertified: Bool

    public init(role: NodeRole, nodeID: String, incarnation: UInt64, tenant: String? = nil, isCertified: Bool = false) {
        self.role = role
        self.nodeID = nodeID
        self.incarnation = incarnation
        self.tenant = tenant
        self.isCertified = isCertified
    }

    public var description: String { "\(self.role) \(self.nodeID)#\(self.incarnation)" }
}

/// What a peer's certificate says about it; the TLS layer reads it once the session is up.
public struct CertifiedIdentity: Sendable, Hashable, CustomStringConvertible {
    public var role: NodeRole
    public var nodeID: String
    /// For a client, the tenant whose sequences it may reach.
    public var tenant: String?

    public init(role: NodeRole, nodeID: String, tenant: String? = nil) {
        self.role = role
        self.nodeID = nodeID
        self.tenant = tenant
    }

    public var description: String {
        "\(self.role) \(self.nodeID)" + (self.tenant.map { " of tenant \($0)" } ?? "")
    }
}

/// The peer an accepted handshake established, and the version both sides will speak.
public struct HandshakeOutcome: Sendable, Hashable {
    public var peer: NodeIdentity
    public var protocolVersion: UInt32
}

/// The connection handshake, without I/O (see `handshake.proto`).
///
/// The connecting side sends `helloFrame()` first and checks the answer with
/// `acceptHelloAck(frame:)`. The accepting side checks the first frame with `acceptHello(frame:)` and
/// answers with `helloAckFrame(for:)`; if the check throws, it sends `rejectionFrame(for:)` and
/// closes the connection.
public struct Handshake: Sendable {
    /// This node.
    public var local: NodeIdentity
    /// The roles this side accepts as a peer (a coordinator accepts workers and clients; a worker
    /// accepts clients and other workers).
    public var acceptedPeerRoles: Set<NodeRole>
    /// The protocol versions this side speaks.
    public var supportedVersions: ClosedRange<UInt32>

    public init(
        local: NodeIdentity,
        acceptedPeerRoles: Set<NodeRole> = Set(NodeRole.allCases),
        supportedVersions: ClosedRange<UInt32> = WireProtocol.supportedVersions
    ) {
        self.local = local
        self.acceptedPeerRoles = acceptedPeerRoles
        self.supportedVersions = supportedVersions
    }

    // MARK: Connecting side

    /// The first envelope the connecting side sends.
    package func hello(requestID: UInt64 = 0) -> Tessera_V1_Envelope {
        var hello = Tessera_V1_Hello()
        hello.protocolVersion = self.supportedVersions.upperBound
        hello.role = self.local.role.proto
        hello.nodeID = self.local.nodeID
        hello.incarnation = self.local.incarnation
        return Tessera_V1_Envelope(requestID: requestID, .hello(hello))
    }

    /// `hello(requestID:)` as a frame payload.
    public func helloFrame(requestID: UInt64 = 0) throws(WireError) -> ByteBuffer {
        try self.hello(requestID: requestID).serializedFrame()
    }

    /// Checks the accepting side's answer: a `HelloAck` with a version this side speaks, from a peer
    /// whose role is accepted and, over TLS, whose role and node id are the ones its `certificate`
    /// names. An `Error` answer is rethrown as the `WireError` it carries.
    package func acceptHelloAck(
        _ envelope: Tessera_V1_Envelope,
        certificate: CertifiedIdentity? = nil
    ) throws(WireError) -> HandshakeOutcome {
        let ack: Tessera_V1_HelloAck
        switch envelope.body {
        case .helloAck(let value):
            ack = value
        case .error(let error):
            var refused = WireError(proto: error)
            refused.message = "the peer refused the handshake: \(refused.message)"
            throw refused
        default:
            throw WireError(.badRequest, "expected hello_ack as the first frame, got \(envelope.bodyName)")
        }
        let peer = try self.validatePeer(
            what: "hello_ack",
            version: ack.protocolVersion,
            role: ack.role,
            nodeID: ack.nodeID,
            incarnation: ack.incarnation,
            certificate: certificate
        )
        return HandshakeOutcome(peer: peer, protocolVersion: ack.protocolVersion)
    }

    /// `acceptHelloAck(_:)` on a frame payload.
    public func acceptHelloAck(frame: ByteBuffer) throws(WireError) -> HandshakeOutcome {
        try self.acceptHelloAck(Tessera_V1_Envelope(frame: frame))
    }

    // MARK: Accepting side

    /// Checks the first envelope of a connection: a `Hello` with a version this side speaks, a role
    /// this side accepts, and a non-empty node id of at most `NodeIdentity.maxNodeIDBytes` bytes;
    /// over TLS, the role and node id its `certificate` names.
    ///
    /// - Throws: `WireError` with `.unsupportedVersion` for a version outside `supportedVersions`,
    ///   `.permissionDenied` for a claim the certificate does not back, otherwise `.badRequest`.
    ///   Either way the connection must be closed after the rejection.
    package func acceptHello(
        _ envelope: Tessera_V1_Envelope,
        certificate: CertifiedIdentity? = nil
    ) throws(WireError) -> HandshakeOutcome {
        guard case .hello(let hello) = envelope.body else {
            throw WireError(.badRequest, "expected hello as the first frame, got \(envelope.bodyName)")
        }
        let peer = try self.validatePeer(
            what: "hello",
            version: hello.protocolVersion,
            role: hello.role,
            nodeID: hello.nodeID,
            incarnation: hello.incarnation,
            certificate: certificate
        )
        return HandshakeOutcome(peer: peer, protocolVersion: hello.protocolVersion)
    }

    /// `acceptHello(_:)` on a frame payload; an unparsable frame throws `.malformedFrame`.
    public func acceptHello(frame: ByteBuffer) throws(WireError) -> HandshakeOutcome {
        try self.acceptHello(Tessera_V1_Envelope(frame: frame))
    }

    /// The answer to an accepted Hello.
    package func helloAck(for outcome: HandshakeOutcome, requestID: UInt64 = 0) -> Tessera_V1_Envelope {
        var ack = Tessera_V1_HelloAck()
        ack.protocolVersion = outcome.protocolVersion
        ack.role = self.local.role.proto
        ack.nodeID = self.local.nodeID
        ack.incarnation = self.local.incarnation
        return Tessera_V1_Envelope(requestID: requestID, .helloAck(ack))
    }

    /// `helloAck(for:requestID:)` as a frame payload.
    public func helloAckFrame(for outcome: HandshakeOutcome, requestID: UInt64 = 0) throws(WireError) -> ByteBuffer {
        try self.helloAck(for: outcome, requestID: requestID).serializedFrame()
    }

    /// The answer to a refused Hello (send it, then close the connection).
    public func rejectionFrame(for error: WireError, requestID: UInt64 = 0) throws(WireError) -> ByteBuffer {
        try Tessera_V1_Envelope(requestID: requestID, error: error).serializedFrame()
    }

    // MARK: Validation

    private func validatePeer(
        what: String,
        version: UInt32,
        role: Tessera_V1_NodeRole,
        nodeID: String,
        incarnation: UInt64,
        certificate: CertifiedIdentity?
    ) throws(WireError) -> NodeIdentity {
        guard self.supportedVersions.contains(version) else {
            throw WireError(
                .unsupportedVersion,
                "\(what) asks for protocol version \(version); this node speaks "
                    + "\(self.supportedVersions.lowerBound)...\(self.supportedVersions.upperBound)"
            )
        }
        guard let peerRole = NodeRole(proto: role) else {
            throw WireError(
                .badRequest,
                "\(what) has role \(role.rawValue); expected one of coordinator (1), worker (2), client (3)"
            )
        }
        guard self.acceptedPeerRoles.contains(peerRole) else {
            let accepted = NodeRole.allCases.filter(self.acceptedPeerRoles.contains).map(\.rawValue)
            throw WireError(
                .badRequest,
                "\(what) comes from a \(peerRole); this \(self.local.role) accepts only "
                    + (accepted.isEmpty ? "no peers" : accepted.joined(separator: ", "))
            )
        }
        let idBytes = nodeID.utf8.count
        guard idBytes > 0, idBytes <= NodeIdentity.maxNodeIDBytes else {
            throw WireError(
                .badRequest,
                "\(what) has a node id of \(idBytes) bytes; expected 1...\(NodeIdentity.maxNodeIDBytes)"
            )
        }
        guard let certificate else { return NodeIdentity(role: peerRole, nodeID: nodeID, incarnation: incarnation) }
        guard certificate.role == peerRole, certificate.nodeID == nodeID else {
            throw WireError(
                .permissionDenied,
                "\(what) claims to be \(peerRole) \(nodeID), but the peer's certificate names \(certificate.role) "
                    + "\(certificate.nodeID)"
            )
        }
        return NodeIdentity(
            role: peerRole,
            nodeID: nodeID,
            incarnation: incarnation,
            tenant: certificate.tenant,
            isCertified: true
        )
    }
}

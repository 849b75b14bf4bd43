/// What a peer may ask for, decided from who it is (its certified identity over mutual TLS).
extension NodeIdentity {
    /// Refuses `request` unless this peer is one of `roles`.
    package func require(_ roles: Set<NodeRole>, for request: Tessera_V1_Envelope) throws(WireError) {
        guard roles.contains(role) else {
            let allowed = NodeRole.allCases.filter(roles.contains).map(\.rawValue).joined(separator: " or ")
            throw WireError(
                .permissionDenied,
                "\(request.bodyName) is accepted from a \(allowed) only; this peer is \(self)"
            )
        }
    }

    package func require(_ role: NodeRole, for request: Tessera_V1_Envelope) throws(WireError) {
        try require([role], for: request)
    }

    /// The tenant a request acts for: the one the client's certificate names (a message that claims
    /// another is refused; an empty claim means the certificate's), else the claim itself.
    package func tenant(claimed: String) throws(WireError) -> String {
        guard let tenant else { return claimed }
        guard claimed.isEmpty || claimed == tenant else {
            throw WireError(.permissionDenied, "this client's certificate is for tenant \(tenant), not \(claimed)")
        }
        return tenant
    }
}

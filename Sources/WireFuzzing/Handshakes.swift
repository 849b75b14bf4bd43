import ClusterWire

/// The handshake checks of every role, with the identities and accepted roles the services use.
enum Handshakes {
    static let coordinator = Handshake(
        local: NodeIdentity(role: .coordinator, nodeID: "coordinator", incarnation: 1),
        acceptedPeerRoles: [.worker, .client]
    )
    /// A worker's listener accepts every role.
    static let worker = Handshake(local: NodeIdentity(role: .worker, nodeID: "worker-1", incarnation: 1))
    static let client = Handshake(
        local: NodeIdentity(role: .client, nodeID: "client", incarnation: 1),
        acceptedPeerRoles: [.coordinator, .worker]
    )
    /// A worker dialing the coordinator.
    static let workerToCoordinator = Handshake(
        local: NodeIdentity(role: .worker, nodeID: "worker-1", incarnation: 1),
        acceptedPeerRoles: [.coordinator]
    )

    /// Checks `envelope` as the first frame on each side of a connection. A listener answers a
    /// refusal with a rejection frame, an accepted hello with a hello_ack, which the connecting side
    /// must then accept.
    static func check(_ envelope: Tessera_V1_Envelope) {
        for listener in [coordinator, worker] {
            let outcome: HandshakeOutcome
            do {
                outcome = try listener.acceptHello(envelope)
            } catch {
                send(try listener.rejectionFrame(for: error, requestID: envelope.requestID))
                continue
            }
            let dialer = Handshake(local: outcome.peer, acceptedPeerRoles: [listener.local.role])
            do {
                let answer = try listener.helloAckFrame(for: outcome, requestID: envelope.requestID)
                let accepted = try dialer.acceptHelloAck(frame: answer)
                precondition(
                    accepted.peer == listener.local && accepted.protocolVersion == outcome.protocolVersion,
                    "the \(dialer.local.role) read the \(listener.local.role)'s hello_ack as \(accepted)"
                )
            } catch {
                preconditionFailure(
                    "the \(dialer.local.role) refused the hello_ack of a hello that was accepted: \(error)"
                )
            }
        }
        for dialer in [client, workerToCoordinator] {
            _ = try? dialer.acceptHelloAck(envelope)
        }
    }
}

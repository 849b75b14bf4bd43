import ClusterAdmin
import ClusterSecurity
import ClusterState
import ClusterTransport
import ClusterWire
import KVCacheCore
import Logging
import Metrics
import Synchronization

/// Answers what reaches the coordinator: registrations and heartbeats and layer statistics from
/// workers; open, placement and close requests from clients, for their own tenant; status from
/// anyone. A request the peer's certified role may not send is refused with PERMISSION_DENIED.
struct CoordinatorHandler: EnvelopeHandler {
    let coordinator: CoordinatorService

    func handle(
        _ request: Tessera_V1_Envelope,
        from connection: PeerConnection
    ) async throws
        -> Tessera_V1_Envelope.OneOf_Body?
    {
        let peer = connection.peer
        switch request.body {
        case .registerWorker(let message):
            try peer.require(.worker, for: request)
            guard message.endpoint.nodeID == peer.nodeID else {
                throw WireError(
                    .permissionDenied,
                    "register_worker names node \(message.endpoint.nodeID); this connection is \(peer.nodeID)"
                )
            }
            let (changes, staleCopies, lostCopies) = try coordinator.state.withLock {
                try $0.register(message, connection: connection)
            }
            for change in changes {
                coordinator.logger.info(
                    "membership changed",
                    metadata: ["peer.id": "\(change.nodeID)", "to": "\(change.to)"]
                )
            }
            // A restarted worker (same node id, higher incarnation) ends its previous incarnation: the
            // copies that one held are gone.
            let replaced = Set(changes.filter { $0.to == .dead }.map(\.nodeID))
            if !replaced.isEmpty { await coordinator.failOver(dead: replaced) }
            // Holders of rebuilt copies that hold nothing of them (restarted, or dropped them) are
            // failed over for those sequences only.
            for (holder, sequences) in lostCopies.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
                await coordinator.failOver(dead: [holder], only: sequences)
            }
            // Copies of sequences closed while this worker could not be told: it is told now (on this
            // connection, which serves its requests while it waits for the acknowledgement).
            for close in staleCopies {
                if case .closeAck = try? await connection.request(.close(close)) {
                    coordinator.state.withLock { $0.closeAnswered(close, by: NodeID(peer.nodeID)) }
                }
            }
            var ack = Tessera_V1_RegisterAck()
            ack.coordinatorID = coordinator.configuration.nodeID
            ack.coordinatorIncarnation = coordinator.configuration.incarnation
            ack.heartbeatIntervalMillis = UInt32(
                coordinator.configuration.failureDetector.heartbeatInterval / .milliseconds(1)
            )
            ack.leaseMillis = UInt32(min(coordinator.configuration.workerLease / .milliseconds(1), Double(UInt32.max)))
            if let view = (coordinator.state.withLock { $0.view() }) { ack.view = view }
            return .registerAck(ack)
        case .heartbeat(let message):
            try peer.require(.worker, for: request)
            try coordinator.state.withLock { try $0.heartbeat(message, from: NodeID(peer.nodeID), on: connection) }
            var ack = Tessera_V1_HeartbeatAck()
            ack.sequenceNumber = message.sequenceNumber
            if let view = (coordinator.state.withLock { $0.view() }) { ack.view = view }
            return .heartbeatAck(ack)
        case .leaveCluster(let message):
            // A worker that is told to stop: its shards move to their other copies now, not after the
            // dead-after time. It can only ever leave itself (the node is the connection's).
            try peer.require(.worker, for: request)
            var ack = Tessera_V1_LeaveAck()
            if let change =
                (coordinator.state.withLock { $0.leave(NodeID(peer.nodeID), incarnation: message.incarnation) })
            {
                Counter(label: TesseraMetrics.memberTransitionsTotal, dimensions: [("state", change.to.rawValue)])
                    .increment()
                coordinator.logger.info(
                    "membership changed",
                    metadata: ["peer.id": "\(change.nodeID)", "to": "\(change.to)", "reason": "left"]
                )
                ack.sequencesMoved = UInt32(await coordinator.failOver(dead: [change.nodeID]))
            }
            return .leaveAck(ack)
        case .layerStats(let message):
            try peer.require(.worker, for: request)
            if let (complete, assign) =
                (try coordinator.state.withLock { try $0.record(message, from: NodeID(peer.nodeID)) })
            {
                await coordinator.assignBudgets(sequenceID: message.sequenceID, complete, assign)
            }
            return nil
        case .openSequence(var message):
            try peer.require(.client, for: request)
            message.tenant = try peer.tenant(claimed: message.tenant)
            guard SequenceIDs.isOpenable(message.sequenceID) else {
                throw WireError(
                    .badRequest,
                    "open_sequence.sequence_id \(message.sequenceID) is the cluster's; open with an id below 2^62 "
                        + "(scoped to the tenant) or 0 (the coordinator chooses one)"
                )
            }
            message.sequenceID = SequenceIDs.cluster(message.sequenceID, tenant: message.tenant)
            let sequence = try await openTightening(message, trace: request.traceContext)
            let id = sequence.message.sequenceID  // chosen by the coordinator when the client sent 0
            if coordinator.logger.logLevel <= .debug {
                let charged = coordinator.state.withLock { $0.admission.sequence(id) }?.chargedBytes ?? 0
                coordinator.logger.debug("admitted", metadata: ["sequence.id": "\(id)", "charged": "\(charged)"])
            }
            if !sequence.announced {
                do {
                    try await coordinator.announce(id, sequence)
                } catch {
                    // Holders the assignment reached must drop it: closed like any sequence, it stays
                    // charged until they have.
                    _ = await coordinator.closeEverywhere(id)
                    throw error
                }
                coordinator.state.withLock { $0.announced(id) }
            }
            coordinator.state.withLock { $0.watch(id, from: connection) }
            return .placement(CoordinatorService.placement(id, sequence))
        case .placementRequest(var message):
            try peer.require(.client, for: request)
            message.tenant = try peer.tenant(claimed: message.tenant)
            message.sequenceID = SequenceIDs.cluster(message.sequenceID, tenant: message.tenant)
            let sequence = try coordinator.state.withLock {
                try $0.sequence(message.sequenceID, tenant: message.tenant)
            }
            coordinator.state.withLock { $0.watch(message.sequenceID, from: connection) }
            return .placement(CoordinatorService.placement(message.sequenceID, sequence))
        case .close(var message):
            try peer.require(.client, for: request)
            message.tenant = try peer.tenant(claimed: message.tenant)
            message.sequenceID = SequenceIDs.cluster(message.sequenceID, tenant: message.tenant)
            _ = try coordinator.state.withLock { try $0.sequence(message.sequenceID, tenant: message.tenant) }
            guard let freed = await coordinator.closeEverywhere(message.sequenceID) else {
                throw WireError(.unknownSequence, "sequence \(message.sequenceID) is not open")
            }
            var ack = Tessera_V1_CloseAck()
            ack.sequenceID = message.sequenceID
            ack.freedBytes = freed
            return .closeAck(ack)
        case .statusRequest(let message):
            // A client sees its own tenant's sequences only (insecure clients, certified as no tenant,
            // see every one, as insecure mode trusts all); the cluster's figures are everyone's.
            var reply = coordinator.state.withLock {
                $0.status(
                    includeSequences: message.includeSequences,
                    tenant: peer.role == .client ? peer.tenant : nil
                )
            }
            reply.coordinatorID = coordinator.configuration.nodeID
            return .statusReply(reply)
        default:
            throw WireError(.badRequest, "the coordinator does not accept \(request.bodyName)")
        }
    }

    /// Admits the sequence; when memory or the tenant's quota is in use, first tightens admitted
    /// sequences (down to the floor ratio) and tries once more, so a refusal means nothing was left.
    private func openTightening(
        _ message: Tessera_V1_OpenSequence,
        trace: [String: String]
    ) async throws -> OpenSequenceState {
        let refusal: WireError
        do {
            return try coordinator.state.withLock { try $0.open(message, trace: trace) }
        } catch let error as WireError {
            refusal = error
        }
        guard refusal.code == .resourceExhausted, refusal.retryAfter != nil,
            let estimate = (coordinator.state.withLock { $0.estimate(message) })
        else { throw refusal }
        await coordinator.relieve(tenant: message.tenant, estimate: estimate)
        do {
            return try coordinator.state.withLock { try $0.open(message, trace: trace) }
        } catch let error as WireError where error.code == .resourceExhausted {
            let short = coordinator.state.withLock { $0.shortfall(tenant: message.tenant, estimate: estimate) }
            Counter(
                label: TesseraMetrics.admissionRefusalsTotal,
                dimensions: [("reason", short.memory > 0 ? "memory" : "quota")]
            ).increment()
            throw error
        }
    }
}

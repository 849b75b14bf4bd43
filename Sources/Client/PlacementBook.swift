import ClusterTransport
import ClusterWire
import Synchronization

/// The placements of a client's open sequences, newest epoch first, and the requests waiting for
/// one of them to move. The coordinator pushes a sequence's new placement to the clients that
/// opened it or asked for it when a failover moves it; a request to a primary that froze is
/// abandoned then, instead of the client asking the coordinator every second for every request.
final class PlacementBook: Sendable {
    private struct State {
        var placements: [UInt64: SequencePlacement] = [:]
        /// Per sequence, requests waiting for a newer epoch than the one they were sent at.
        var waiters: [UInt64: [Int: (epoch: UInt64, continuation: CheckedContinuation<Void, Never>)]] = [:]
        var nextWaiter = 0
    }

    private let state = Mutex(State())

    func placement(_ sequenceID: UInt64) -> SequencePlacement? {
        state.withLock { $0.placements[sequenceID] }
    }

    var sequenceIDs: [UInt64] { state.withLock { $0.placements.keys.sorted() } }

    /// Keeps `placement` unless an equal or newer epoch is known, and wakes the requests it moved;
    /// returns the placement now kept.
    @discardableResult
    func remember(_ placement: SequencePlacement) -> SequencePlacement {
        let (kept, woken) = state.withLock { state -> (SequencePlacement, [CheckedContinuation<Void, Never>]) in
            if let known = state.placements[placement.sequenceID], known.epoch > placement.epoch { return (known, []) }
            state.placements[placement.sequenceID] = placement
            let waiting = state.waiters[placement.sequenceID] ?? [:]
            let moved = waiting.filter { $0.value.epoch < placement.epoch }
            for key in moved.keys { state.waiters[placement.sequenceID]?[key] = nil }
            return (placement, moved.values.map(\.continuation))
        }
        for continuation in woken { continuation.resume() }
        return kept
    }

    /// Forgets a closed sequence; requests still waiting on it return.
    func forget(_ sequenceID: UInt64) {
        let woken = state.withLock { state in
            state.placements[sequenceID] = nil
            return state.waiters.removeValue(forKey: sequenceID)?.values.map(\.continuation) ?? []
        }
        for continuation in woken { continuation.resume() }
    }

    /// Returns once the sequence has a placement newer than `epoch`, is forgotten, or the task is
    /// cancelled.
    func waitForMove(of sequenceID: UInt64, from epoch: UInt64) async {
        let id = state.withLock { state in
            defer { state.nextWaiter += 1 }
            return state.nextWaiter
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let wait = state.withLock { state -> Bool in
                    guard !Task.isCancelled, let known = state.placements[sequenceID], known.epoch <= epoch else {
                        return false
                    }
                    state.waiters[sequenceID, default: [:]][id] = (epoch, continuation)
                    return true
                }
                if !wait { continuation.resume() }
            }
        } onCancel: {
            let waiting = state.withLock { $0.waiters[sequenceID]?.removeValue(forKey: id) }
            waiting?.continuation.resume()
        }
    }
}

/// Takes the placements the coordinator pushes on the client's connection to it; anything else a
/// peer sends a client is refused.
struct PlacementPushes: EnvelopeHandler {
    let book: PlacementBook

    func handle(
        _ request: Tessera_V1_Envelope,
        from connection: PeerConnection
    ) async throws -> Tessera_V1_Envelope.OneOf_Body? {
        guard case .placementMoved(let message) = request.body, connection.peer.role == .coordinator else {
            throw WireError(
                .badRequest,
                "a client accepts only placement_moved from the coordinator, not \(request.bodyName)"
            )
        }
        book.remember(SequencePlacement(message.placement))
        return nil
    }
}

extension SequencePlacement {
    init(_ message: Tessera_V1_Placement) {
        self.init(
            sequenceID: message.sequenceID,
            epoch: message.epoch,
            shards: message.shards.map { shard in
                SequencePlacement.Shard(
                    id: shard.shardID,
                    layers: Int(shard.firstLayer)..<(Int(shard.firstLayer) + Int(shard.layerCount)),
                    primary: NodeAddress(host: shard.primary.host, port: Int(shard.primary.port)),
                    replicas: shard.replicas.map { NodeAddress(host: $0.host, port: Int($0.port)) }
                )
            }
        )
    }
}

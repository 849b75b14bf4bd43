import ClusterTransport
import ClusterWire
import FoundationEssentials
import KVCacheCore
import Testing

@testable import Worker

/// Re-replication's copy of a shard, without processes: the parts a primary cuts from a compressed
/// shard, the receiver's assembly and digest check, and the store's rules around a copy.
struct ShardTransferTests {
    static let geometry = ModelGeometry.tiny

    /// A compressed shard of sequence 7 (layers 0 and 1) held by worker-1 as primary, with a decode
    /// step done of the 8 it declared: every head has 6 rows, the last one appended by decode (so
    /// unscored).
    static func shard(storage: ScalarType, seed: UInt64 = 1) throws -> HeldSequence {
        let layout = try PromptLayout(spans: [
            ModalitySpan(.text, start: 0, count: 2), ModalitySpan(.image(0), start: 2, count: 3),
        ])
        var assignment = Tessera_V1_ShardAssignment()
        assignment.tenant = "t"
        assignment.sequenceID = 7
        assignment.epoch = 3
        assignment.decodeTokens = 8
        assignment.shard.shardID = 1
        assignment.shard.firstLayer = 0
        assignment.shard.layerCount = 2
        assignment.shard.primary.nodeID = "worker-1"
        var replica = Tessera_V1_Endpoint()
        replica.nodeID = "worker-2"
        replica.host = "127.0.0.1"
        replica.port = 9
        assignment.shard.replicas = [replica]
        assignment.model = try geometry.proto()
        assignment.spans = try layout.proto()
        assignment.policy = try CompressionPolicy.full.proto(retention: 1)
        var held = try HeldSequence(assignment: assignment, localNodeID: "worker-1")
        var random = SplitMix(seed: seed)
        var cache = ShardCache(storage: storage)
        for layer in 0..<2 {
            func heads<S: KVScalar>(_: S.Type) -> [HeadCache<S>] {
                (0..<geometry.kvHeads).map { _ in
                    var head = HeadCache<S>(headDim: geometry.headDim)
                    for row in 0..<6 {
                        let tag = ModalityTag(row < 2 || row == 5 ? .text : .image(0))
                        head.append(
                            key: (0..<geometry.headDim).map { _ in random.unit() },
                            value: (0..<geometry.headDim).map { _ in random.unit() },
                            position: row,
                            tag: tag
                        )
                    }
                    return head
                }
            }
            switch storage {
            case .float32: cache.insert(layer: layer, float32: heads(Float.self))
            case .float16: cache.insert(layer: layer, float16: heads(Float16.self))
            }
            held.rowScores[layer] = (0..<geometry.kvHeads).map { h in (0..<5).map { Float(h * 10 + $0) } }
        }
        held.cache = cache
        held.nextStep = 1
        var result = Tessera_V1_DecodeResult()
        result.sequenceID = 7
        result.step = 0
        held.lastResult = (0, result)
        return held
    }

    @Test(arguments: [ScalarType.float32, .float16])
    func aCopyArrivesWithTheSameBytesAndStepState(storage: ScalarType) throws {
        let held = try Self.shard(storage: storage)
        let parts = try OutgoingShard(held, sequenceID: 7).parts
        #expect(parts.count == 4)
        guard case .begin(let begin) = parts[0].part, case .commit(let commit) = parts[3].part else {
            Issue.record("parts are not begin, layers, commit: \(parts.map(\.part))")
            return
        }
        var incoming = try IncomingShard(begin, sequenceID: 7, from: "worker-1")
        for part in parts[1...2] {
            guard case .layer(let layer) = part.part else { continue }
            try incoming.take(layer)
        }
        let copy = try incoming.finish(commit)
        #expect(copy.cache?.digest == held.cache?.digest)
        #expect(copy.cache?.storage == storage)
        #expect(copy.rowScores[1]?[1] == held.rowScores[1]?[1])
        #expect(copy.nextStep == 1 && copy.lastResult?.step == 0)
        #expect(!copy.isPrimary && copy.replicas.isEmpty)
        #expect(copy.epoch == 3 && copy.layers == 0..<2)
    }

    @Test func aDamagedOrIncompleteCopyIsNeverInstalled() throws {
        let held = try Self.shard(storage: .float32)
        var parts = try OutgoingShard(held, sequenceID: 7).parts
        guard case .begin(let begin) = parts[0].part, case .commit(let commit) = parts[3].part,
            case .layer(var layer) = parts[2].part
        else { return }
        // One value changed in transit (a bit that TCP's checksum let through).
        var bytes = [UInt8](layer.heads[0].values.data)
        bytes[0] ^= 0x40
        layer.heads[0].values.data = .init(bytes)
        parts[2].part = .layer(layer)
        var damaged = try IncomingShard(begin, sequenceID: 7, from: "worker-1")
        for case .layer(let part) in parts[1...2].map(\.part) { try damaged.take(part) }
        #expect {
            try damaged.finish(commit)
        } throws: { error in
            // Refused without naming either digest (it would tell a forger what to aim for).
            (error as? WireError)?.code == .invalidValue && "\(error)".contains("differ")
                && !"\(error)".contains("\(held.cache?.digest ?? 0)")
        }

        var incomplete = try IncomingShard(begin, sequenceID: 7, from: "worker-1")
        if case .layer(let first) = parts[1].part { try incomplete.take(first) }
        #expect {
            try incomplete.finish(commit)
        } throws: { "\($0)".contains("before layers [1] arrived") }

        // Rows, positions and tags that disagree are refused at the layer.
        guard case .layer(var short) = try OutgoingShard(held, sequenceID: 7).parts[1].part else { return }
        short.heads[0].positions.removeLast()
        var mismatched = try IncomingShard(begin, sequenceID: 7, from: "worker-1")
        #expect(throws: WireError.self) { try mismatched.take(short) }
    }

    /// The worker's path: each layer converted apart from the store (on compute threads), layers in
    /// any order (several are in flight), only from the worker that began the copy.
    @Test(arguments: [ScalarType.float32, .float16])
    func layersConvertedApartArriveInAnyOrder(storage: ScalarType) async throws {
        let held = try Self.shard(storage: storage)
        let parts = try OutgoingShard(held, sequenceID: 7).parts
        var target = WorkerState()
        _ = try target.receive(parts[0], from: "worker-1")
        #expect {
            _ = try target.incomingFormat(7, from: "worker-3")
        } throws: { ($0 as? WireError)?.code == .permissionDenied }
        let format = try target.incomingFormat(7, from: "worker-1")
        #expect(format.storage == storage && format.geometry == Self.geometry)
        #expect(format.decodeRows == 7, "8 declared decode steps, one done")
        /// Whether every head has room for the 7 rows to come: a short array would be copied whole
        /// by the first decode step after the copy.
        func roomy<S>(_ heads: [HeadCache<S>]) -> Bool {
            heads.allSatisfy {
                $0.keys.capacity >= 13 * Self.geometry.headDim && $0.values.capacity >= 13 * Self.geometry.headDim
                    && $0.positions.capacity >= 13 && $0.tags.capacity >= 13
            }
        }
        for part in parts.dropFirst().dropLast().reversed() {
            guard case .layer(let state) = part.part else { continue }
            let layer = try format.layer(state)
            switch layer.heads {
            case .float32(let heads): #expect(roomy(heads))
            case .float16(let heads): #expect(roomy(heads))
            }
            #expect {
                try target.receive(layer, sequenceID: 7, from: "worker-3")
            } throws: { ($0 as? WireError)?.code == .permissionDenied }
            try target.receive(layer, sequenceID: 7, from: "worker-1")
        }
        #expect(try target.receive(parts.last!, from: "worker-1") == held.cache?.digest)
    }

    @Test func theStoreInstallsACopyAsAReplicaAndHoldsDecodeBackWhileCopying() async throws {
        let held = try Self.shard(storage: .float32)
        let parts = try OutgoingShard(held, sequenceID: 7).parts

        var target = WorkerState()
        // Only the shard's primary may send a copy, and every part of it.
        #expect {
            try target.receive(parts[0], from: "worker-3")
        } throws: { ($0 as? WireError)?.code == .permissionDenied }
        #expect(try target.receive(parts[0], from: "worker-1") == nil)
        #expect {
            try target.receive(parts[1], from: "worker-3")
        } throws: { ($0 as? WireError)?.code == .permissionDenied }
        for part in parts.dropFirst().dropLast() { #expect(try target.receive(part, from: "worker-1") == nil) }
        let digest = try target.receive(parts.last!, from: "worker-1")
        #expect(digest == held.cache?.digest)
        // A replica takes forwarded writes only, at the shard's epoch, from the shard's primary only.
        _ = try target.checked(7, tenant: "t", shardID: 1, epoch: 3, forwardedBy: "worker-1")
        #expect(throws: WireError.self) { try target.checked(7, tenant: "t", shardID: 1, epoch: 3) }
        #expect {
            try target.checked(7, tenant: "t", shardID: 1, epoch: 3, forwardedBy: "worker-3")
        } throws: { ($0 as? WireError)?.code == .permissionDenied }
        // A second copy of any shard of the sequence is refused.
        #expect(throws: WireError.self) { try target.receive(parts[0], from: "worker-1") }

        var source = WorkerState()
        _ = try source.assign(7, held)
        // Only the primary at the current epoch copies.
        #expect(throws: WireError.self) { try source.beginTransfer(7, shardID: 1, epoch: 2) }
        #expect(try source.beginTransfer(7, shardID: 1, epoch: 3).ready != nil)
        #expect {
            try source.beginDecode(7, step: 1, inputs: nil, threads: 1)
        } throws: { ($0 as? WireError)?.code == .unavailable }
        var endpoint = Tessera_V1_Endpoint()
        endpoint.nodeID = "worker-3"
        endpoint.host = "127.0.0.1"
        endpoint.port = 10
        source.endTransfer(7, adding: endpoint)
        let after = try source.checked(7, tenant: "t", shardID: 1, epoch: 3)
        #expect(after.replicas.map(\.port) == [9, 10])
        #expect(source.heldShards().first?.assignment.shard.replicas.map(\.nodeID) == ["worker-2", "worker-3"])
        // A step is forwarded to the replicas of the moment it begins, so a step whose request was
        // checked before the copy ended still reaches the new replica (its snapshot lacks the step).
        guard case .replay(_, let replayTo) = try source.beginDecode(7, step: 0, inputs: nil, threads: 1) else {
            Issue.record("step 0 was done; a retry of it must be replayed")
            return
        }
        #expect(replayTo.map(\.port) == [9, 10])
        let g = Self.geometry
        let input = try DecodeStepInput(
            geometry: g,
            keys: .init(repeating: 0.1, count: g.kvHeads * g.headDim),
            values: .init(repeating: 0.2, count: g.kvHeads * g.headDim),
            queries: .init(repeating: 0.3, count: g.queryHeads * g.headDim)
        )
        guard case .run(let job) = try source.beginDecode(7, step: 1, inputs: [0: input, 1: input], threads: 1)
        else {
            Issue.record("step 1 is next; it must run")
            return
        }
        #expect(job.held.replicas.map(\.port) == [9, 10])
        source.finishDecode(job, result: nil)
    }
}

/// A small seeded generator for test values.
private struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func unit() -> Float {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return Float((z ^ (z >> 31)) >> 40) / Float(1 << 24) - 0.5
    }
}

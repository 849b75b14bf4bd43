import ClusterTransport
import ClusterWire
import KVCacheCore

/// Copying a compressed shard to another worker (re-replication): the sender cuts the shard's state
/// into transfer parts (begin, one per layer, commit with the cache's digest); the receiver assembles
/// them in an `IncomingShard` and installs the copy only if its digest equals the sender's.
///
/// A layer's part is cut only when it is about to be sent: the sender never holds a second copy of
/// the whole shard, and cutting the next layers overlaps sending the first.
struct OutgoingShard: Sendable {
    let sequenceID: UInt64
    /// The digest of the shard's cache, which the target's copy must match (it reads every byte:
    /// make an `OutgoingShard` off the event loop).
    let digest: UInt64
    private let held: HeldSequence
    private let cache: ShardCache

    /// A copy of `held`, which must be compressed (it has a cache).
    init(_ held: HeldSequence, sequenceID: UInt64) throws(WireError) {
        guard let cache = held.cache else {
            throw WireError(.internal, "sequence \(sequenceID) has no compressed cache to copy")
        }
        self.sequenceID = sequenceID
        self.held = held
        self.cache = cache
        digest = cache.digest
    }

    /// The shard's assignment at its epoch, its step state and its layer count.
    var begin: Tessera_V1_ShardTransfer {
        var begin = Tessera_V1_ShardTransferBegin()
        begin.assignment = held.assignment
        begin.assignment.epoch = held.epoch
        begin.storage = cache.storage.wire.proto
        begin.nextStep = UInt32(held.nextStep)
        if let lastResult = held.lastResult { begin.lastResult = lastResult.body }
        begin.layers = UInt32(held.layers.count)
        begin.statistics = held.statistics
        return Tessera_V1_ShardTransfer(sequenceID: sequenceID, part: .begin(begin))
    }

    /// The layers to send, one part each.
    var layers: Range<Int> { held.layers }

    /// The part of `layer`: its rows, their scores and its synthetic decode inputs.
    func part(layer: Int) throws(WireError) -> Tessera_V1_ShardTransfer {
        var state = Tessera_V1_ShardLayerState()
        state.layer = UInt32(layer)
        let scores = held.rowScores[layer] ?? []
        switch cache.storage {
        case .float32:
            state.heads = try Self.encode(cache.float32[layer] ?? [], scores: scores) {
                values,
                shape throws(WireError) in
                try Tessera_V1_Tensor(float32: values, shape: shape)
            }
        case .float16:
            state.heads = try Self.encode(cache.float16[layer] ?? [], scores: scores) {
                values,
                shape throws(WireError) in
                try Tessera_V1_Tensor(float16: values, shape: shape)
            }
        }
        for input in held.syntheticDecode?[layer] ?? [] {
            state.syntheticDecode.append(try input.proto(layer: layer, geometry: held.geometry))
        }
        return Tessera_V1_ShardTransfer(sequenceID: sequenceID, part: .layer(state))
    }

    /// The digest the receiver's copy must have to be installed.
    var commit: Tessera_V1_ShardTransfer {
        var commit = Tessera_V1_ShardTransferCommit()
        commit.digest = digest
        return Tessera_V1_ShardTransfer(sequenceID: sequenceID, part: .commit(commit))
    }

    /// Every part in order: begin, the layers, commit.
    var parts: [Tessera_V1_ShardTransfer] {
        get throws(WireError) {
            var parts = [begin]
            for layer in layers { parts.append(try part(layer: layer)) }
            return parts + [commit]
        }
    }

    private static func encode<S: KVScalar>(
        _ heads: [HeadCache<S>],
        scores: [[Float]],
        tensor: ([S], [Int]) throws(WireError) -> Tessera_V1_Tensor
    ) throws(WireError) -> [Tessera_V1_HeadState] {
        var states: [Tessera_V1_HeadState] = []
        for (h, head) in heads.enumerated() {
            var state = Tessera_V1_HeadState()
            state.keys = try tensor(head.keys, [head.count, head.headDim])
            state.values = try tensor(head.values, [head.count, head.headDim])
            state.positions = head.positions
            state.tags = head.tags.map(\.rawValue)
            state.rowScores = h < scores.count ? scores[h] : []
            states.append(state)
        }
        return states
    }
}

/// A copy being received: the shard's assignment and step state from the begin part, then its layers.
struct IncomingShard: Sendable {
    var held: HeldSequence
    var cache: ShardCache
    /// The node id of the primary sending the copy; every part must come from it.
    var sender: String

    /// Starts a copy from its begin part; the receiver holds it as a replica.
    init(_ begin: Tessera_V1_ShardTransferBegin, sequenceID: UInt64, from sender: String) throws(WireError) {
        held = try HeldSequence(assignment: begin.assignment, localNodeID: "")
        guard begin.assignment.shard.primary.nodeID == sender else {
            throw WireError(
                .permissionDenied,
                "a shard copy comes from the shard's primary; \(sender) is not the primary it names"
            )
        }
        self.sender = sender
        guard Int(begin.layers) == held.layers.count else {
            throw WireError(
                .badRequest,
                "shard_transfer.begin.layers is \(begin.layers); the shard has \(held.layers.count)"
            )
        }
        cache = ShardCache(storage: try ScalarType(proto: begin.storage, field: "shard_transfer.begin.storage"))
        held.nextStep = Int(begin.nextStep)
        held.statistics = begin.statistics
        if begin.hasLastResult { held.lastResult = (Int(begin.lastResult.step), begin.lastResult) }
        if held.nextStep > 0, held.lastResult == nil {
            throw WireError(.badRequest, "shard_transfer.begin: step \(held.nextStep) is next but no last_result came")
        }
    }

    /// Takes one layer's rows (checked against the geometry) and synthetic decode inputs.
    mutating func take(_ state: Tessera_V1_ShardLayerState) throws(WireError) {
        try self.take(format.layer(state))
    }

    /// What this copy's layers are converted for. Each head gets room for the rows the sequence's
    /// decode steps may still append, or its first step would copy the head.
    var format: IncomingFormat {
        IncomingFormat(
            geometry: held.geometry,
            storage: cache.storage,
            decodeRows: max(0, Int(held.assignment.decodeTokens) - held.nextStep)
        )
    }

    /// Takes one layer converted already (`IncomingLayer`, outside the store's lock).
    mutating func take(_ layer: IncomingLayer) throws(WireError) {
        guard held.layers.contains(layer.layer) else {
            throw WireError(
                .badRequest,
                "shard_transfer.layer \(layer.layer) is not in the shard's layers \(held.layers)"
            )
        }
        switch layer.heads {
        case .float32(let heads): cache.insert(layer: layer.layer, float32: heads)
        case .float16(let heads): cache.insert(layer: layer.layer, float16: heads)
        }
        held.rowScores[layer.layer] = layer.rowScores
        if let inputs = layer.syntheticDecode {
            held.syntheticDecode = held.syntheticDecode ?? [:]
            held.syntheticDecode![layer.layer] = inputs
        }
    }

    /// The installed copy, once every layer arrived and its digest equals the sender's.
    func finish(_ commit: Tessera_V1_ShardTransferCommit) throws(WireError) -> HeldSequence {
        let missing = held.layers.filter { !cache.holds(layer: $0) }
        guard missing.isEmpty else {
            throw WireError(.badRequest, "shard_transfer.commit before layers \(missing) arrived")
        }
        guard cache.digest == commit.digest else {
            // No digest in the message: it would tell a forger what to aim for.
            throw WireError(.invalidValue, "the copied shard's bytes differ from the sender's; the copy is dropped")
        }
        var copy = held
        copy.cache = cache
        copy.headRowShares = cache.headRowShares(promptLength: held.layout.promptLength)
        return copy
    }
}

/// What a layer of a shard copy is converted for: the model, the cache's storage type and the decode
/// rows each head makes room for.
struct IncomingFormat: Sendable {
    let geometry: ModelGeometry
    let storage: ScalarType
    let decodeRows: Int

    /// `state` checked and converted (`IncomingLayer`).
    func layer(_ state: Tessera_V1_ShardLayerState) throws(WireError) -> IncomingLayer {
        try IncomingLayer(state, geometry: geometry, storage: storage, decodeRows: decodeRows)
    }
}

/// One layer of a copy, checked against the shard's geometry and converted to cache rows: the
/// per-byte work of receiving a copy, done on the worker's compute threads before the store takes it.
struct IncomingLayer: Sendable {
    enum Heads: Sendable {
        case float32([HeadCache<Float>])
        case float16([HeadCache<Float16>])
    }

    var layer: Int
    var heads: Heads
    var rowScores: [[Float]]
    var syntheticDecode: [DecodeStepInput]?

    /// The layer's heads with room for `decodeRows` more rows each.
    init(
        _ state: Tessera_V1_ShardLayerState,
        geometry g: ModelGeometry,
        storage: ScalarType,
        decodeRows: Int
    ) throws(WireError) {
        let spare = max(0, decodeRows) * g.headDim
        layer = Int(state.layer)
        guard state.heads.count == g.kvHeads else {
            throw WireError(
                .invalidShape,
                "shard_transfer.layer \(layer) has \(state.heads.count) heads; the model has \(g.kvHeads)"
            )
        }
        switch storage {
        case .float32:
            heads = .float32(
                try Self.decode(state, g, layer, decodeRows: decodeRows) { tensor, name throws(WireError) in
                    try tensor.floatValues(name: name, spare: spare)
                }
            )
        case .float16:
            heads = .float16(
                try Self.decode(state, g, layer, decodeRows: decodeRows) { tensor, name throws(WireError) in
                    try tensor.float16Values(name: name, spare: spare)
                }
            )
        }
        rowScores = state.heads.map(\.rowScores)
        if !state.syntheticDecode.isEmpty {
            var inputs: [DecodeStepInput] = []
            for step in state.syntheticDecode { inputs.append(try DecodeStepInput(proto: step, geometry: g)) }
            syntheticDecode = inputs
        }
    }

    private static func decode<S: KVScalar>(
        _ state: Tessera_V1_ShardLayerState,
        _ g: ModelGeometry,
        _ layer: Int,
        decodeRows: Int,
        values: (Tessera_V1_Tensor, String) throws(WireError) -> [S]
    ) throws(WireError) -> [HeadCache<S>] {
        var heads: [HeadCache<S>] = []
        for (h, part) in state.heads.enumerated() {
            let name = "shard_transfer.layer \(layer) head \(h)"
            guard
                let head = HeadCache(
                    headDim: g.headDim,
                    keys: try values(part.keys, "\(name) keys"),
                    values: try values(part.values, "\(name) values"),
                    positions: part.positions,
                    tags: part.tags.map(ModalityTag.init(rawValue:)),
                    decodeRows: decodeRows
                )
            else {
                throw WireError(
                    .invalidShape,
                    "\(name): keys, values, positions and tags disagree on the row count (headDim \(g.headDim))"
                )
            }
            // Prompt rows have scores; rows appended by decode (always kept) do not.
            guard part.rowScores.count <= head.count else {
                throw WireError(.invalidShape, "\(name): \(part.rowScores.count) row scores for \(head.count) rows")
            }
            heads.append(head)
        }
        return heads
    }
}

extension Tessera_V1_ShardTransfer {
    init(sequenceID: UInt64, part: OneOf_Part) {
        self.init()
        self.sequenceID = sequenceID
        self.part = part
    }

    /// Bytes of tensor data and per-row arrays in a layer part (what the copy moves).
    var payloadBytes: UInt64 {
        guard case .layer(let layer) = part else { return 0 }
        return layer.heads.reduce(0) { total, head in
            total + UInt64(head.keys.data.count + head.values.data.count)
                + UInt64(4 * (head.positions.count + head.tags.count + head.rowScores.count))
        }
    }
}

extension HeldSequence {
    /// The sequence as its shard assignment describes it; the worker `localNodeID` is its primary
    /// when the assignment names it so.
    init(assignment message: Tessera_V1_ShardAssignment, localNodeID: String) throws(WireError) {
        let geometry = try ModelGeometry(proto: message.model)
        let layout = try PromptLayout(proto: message.spans)
        // Every head reserves room for the declared decode rows.
        _ = try layout.checkedDecodeTokens(message.decodeTokens, field: "assignment.decode_tokens")
        let (policy, retention) = try CompressionPolicy.decode(proto: message.policy)
        let first = Int(message.shard.firstLayer)
        let count = Int(message.shard.layerCount)
        guard count >= 1, first + count <= geometry.layers else {
            throw WireError(
                .invalidShape,
                "shard layers \(first)..<\(first + count) are outside 0..<\(geometry.layers)"
            )
        }
        self.init(
            tenant: message.tenant,
            shardID: message.shard.shardID,
            epoch: message.epoch,
            layers: first..<(first + count),
            geometry: geometry,
            layout: layout,
            policy: policy,
            retention: retention,
            assignment: message
        )
        isPrimary = !localNodeID.isEmpty && message.shard.primary.nodeID == localNodeID
        replicas = isPrimary ? message.shard.replicas.map { NodeAddress(host: $0.host, port: Int($0.port)) } : []
    }
}

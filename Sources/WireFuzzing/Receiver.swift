import ClusterWire
import KVCacheCore
import NIOCore
import SwiftProtobuf
import Workloads

/// What the coordinator, a worker and a client do with each frame a peer sends, short of acting on
/// it: parse, handshake, and the conversions of `WorkerHandler`, `CoordinatorHandler`,
/// `CoordinatorState`, `IncomingShard` and `TesseraClient`. Kept in step with them by hand: a handler
/// that starts converting another field should convert it here too.
struct Receiver {
    /// The errors the body conversions answered, in order.
    private(set) var answered: [WireError] = []
    /// What a client adds up over the decode results of one step (one per shard): the frames of one
    /// input play the shards.
    private var work = PrefillWork()

    mutating func receive(_ frame: ByteBuffer) {
        let envelope: Tessera_V1_Envelope
        // Nodes decode frames without copying their tensors; swift-protobuf's own decoding of the
        // whole frame is the reference it must equal, in what it accepts and what it gives.
        let reference = try? Tessera_V1_Envelope(serializedBytes: Array(frame.readableBytesView))
        do {
            envelope = try Tessera_V1_Envelope(frame: frame)
        } catch {
            precondition(reference == nil, "the frame decoder refused a frame swift-protobuf parses: \(error)")
            self.answer(requestID: 0, error)
            return
        }
        // Compared as bytes: a message holding a NaN double is not equal to itself.
        precondition(
            (try? envelope.serializedFrame()) == reference.flatMap { try? $0.serializedFrame() },
            "the frame decoder's envelope differs from swift-protobuf's"
        )
        Self.checkReencoding(envelope)
        Handshakes.check(envelope)
        self.attempt(envelope.requestID) {
            _ = try envelope.requiredBody
        }
        if let body = envelope.body { self.convert(body, requestID: envelope.requestID) }
    }

    /// Builds the Error frame a node answers `error` with.
    mutating func answer(requestID: UInt64, _ error: WireError) {
        self.answered.append(error)
        send(try Tessera_V1_Envelope(requestID: requestID, error: error).serializedFrame())
    }

    /// Runs one conversion; what it throws is answered as the handler would.
    private mutating func attempt(_ requestID: UInt64, _ conversion: () throws -> Void) {
        do {
            try conversion()
        } catch let error as WireError {
            self.answer(requestID: requestID, error)
        } catch {
            // The handlers wrap the few errors of other layers (a workload name) as bad requests.
            self.answer(requestID: requestID, WireError(.badRequest, "\(error)"))
        }
    }

    // MARK: Bodies

    // One case per body, so that a new message type does not compile until it is handled here.
    private mutating func convert(_ body: Tessera_V1_Envelope.OneOf_Body, requestID id: UInt64) {
        switch body {
        case .hello, .helloAck:
            break  // `Handshakes.check` took them.
        case .error(let error):
            // A connection rethrows a peer's error; a node may relay it.
            _ = WireError(proto: error).proto
        case .registerWorker(let message):
            // A restarted coordinator rebuilds its sequences from the workers' held shards.
            for held in message.heldShards { self.assignment(held.assignment, id) }
        case .heartbeat(let message):
            _ = message.kvBytesByModality.byModality
        case .statusReply(let message):
            for worker in message.workers { _ = worker.kvBytesByModality.byModality }
        case .openSequence(let message):
            _ = self.sequence(model: message.model, spans: message.spans, policy: message.policy, id)
        case .shardAssignment(let message):
            self.assignment(message, id)
        case .layerStats(let message):
            self.statistics(message, id)
        case .assignBudget(let message):
            self.budgets(message, id)
        case .prefill(let message):
            self.prefill(message, id)
        case .decode(let message):
            for layer in message.layers { self.attempt(id) { try Self.decodeStep(layer) } }
        case .decodeResult(let result):
            for output in result.outputs { self.attempt(id) { try Self.output(output) } }
            self.work.add(PrefillWork(result))
        case .shardTransfer(let message):
            self.transfer(message, id)
        case .registerAck, .heartbeatAck, .leaveCluster, .leaveAck, .statusRequest, .placementRequest, .placement,
            .placementMoved, .close,
            .closeAck,
            .shardAssignmentAck, .budgetApplied, .prefillAck, .copyShard, .copyShardAck, .shardTransferAck:
            break  // Ids and counters only: the handlers look them up or add them, converting nothing.
        }
    }

    /// Geometry, layout and policy of a sequence, each converted on its own (so that one bad field
    /// does not hide the others), then the rows the policy will observe.
    private mutating func sequence(
        model: Tessera_V1_ModelGeometry,
        spans: [Tessera_V1_ModalitySpan],
        policy: Tessera_V1_Policy,
        _ id: UInt64
    ) -> (geometry: ModelGeometry?, layout: PromptLayout?) {
        var geometry: ModelGeometry?
        var layout: PromptLayout?
        var compression: CompressionPolicy?
        self.attempt(id) {
            let value = try ModelGeometry(proto: model)
            reencodes(value, "model") { try ModelGeometry(proto: $0.proto()) }
            geometry = value
        }
        self.attempt(id) {
            let value = try PromptLayout(proto: spans)
            reencodes(value, "spans") { try PromptLayout(proto: $0.proto()) }
            layout = value
        }
        self.attempt(id) {
            let (value, retention) = try CompressionPolicy.decode(proto: policy)
            reencodes(value, "policy") { try CompressionPolicy.decode(proto: $0.proto(retention: retention)).policy }
            compression = value
        }
        if let layout, let compression {
            _ = compression.requirements(layout: layout).firstRow
        }
        return (geometry, layout)
    }

    private mutating func assignment(_ message: Tessera_V1_ShardAssignment, _ id: UInt64) {
        _ = self.sequence(model: message.model, spans: message.spans, policy: message.policy, id)
    }

    /// Checked against no geometry and against the seeds' (the coordinator uses the sequence's).
    private mutating func statistics(_ message: Tessera_V1_LayerStats, _ id: UInt64) {
        for geometry in [nil, Seeds.geometry] {
            self.attempt(id) {
                let value = try LayerStatistics(proto: message, geometry: geometry)
                reencodes(value, "layer_stats") {
                    try LayerStatistics(proto: $0.proto(sequenceID: message.sequenceID, epoch: message.epoch))
                }
            }
        }
    }

    /// Checked against no geometry and against the seeds' (the worker uses its shard's).
    private mutating func budgets(_ message: Tessera_V1_AssignBudget, _ id: UInt64) {
        for geometry in [nil, Seeds.geometry] {
            self.attempt(id) {
                let value = try [LayerBudget](proto: message, geometry: geometry)
                reencodes(value, "assign_budget") {
                    try [LayerBudget](proto: $0.proto(sequenceID: message.sequenceID, epoch: message.epoch))
                }
            }
        }
    }

    /// The worker takes geometry and layout from its shard assignment; here the prefill's own stand in,
    /// or the seeds' where those are invalid.
    private mutating func prefill(_ message: Tessera_V1_Prefill, _ id: UInt64) {
        let (geometry, layout) = self.sequence(
            model: message.model,
            spans: message.spans,
            policy: message.policy,
            id
        )
        switch message.source {
        case .inlineTensors(let tensors):
            let promptLength = (layout ?? Seeds.layout).promptLength
            for layer in tensors.layers {
                self.attempt(id) { try Self.prefill(layer, geometry ?? Seeds.geometry, promptLength) }
            }
        case .synthetic(let source):
            self.attempt(id) { _ = try WorkloadPreset.named(source.workload) }
            if source.hasShape {
                self.attempt(id) {
                    let settings = try TraceSettings(shape: source.shape)
                    reencodes(settings, "prefill.synthetic.shape") { try TraceSettings(shape: $0.shape) }
                }
            }
        case nil:
            self.attempt(id) { throw WireError(.badRequest, "prefill needs a source: inline_tensors or synthetic") }
        }
    }

    private mutating func transfer(_ message: Tessera_V1_ShardTransfer, _ id: UInt64) {
        switch message.part {
        case .begin(let begin):
            self.assignment(begin.assignment, id)
            self.attempt(id) { _ = try ScalarType(proto: begin.storage, field: "shard_transfer.begin.storage") }
        case .layer(let state):
            for head in state.heads { self.attempt(id) { try Self.head(head) } }
            for step in state.syntheticDecode { self.attempt(id) { try Self.decodeStep(step) } }
        case .commit, nil:
            break  // A digest to compare, or no part: nothing to convert.
        }
    }

    // MARK: Tensors

    /// The geometry a frame's tensor shapes imply (the receiver knows it from the sequence, a single
    /// frame only from its shapes), or the seeds' when they imply no valid one; lets mutated shapes
    /// reach the success paths too.
    private static func geometry(kvHeads: UInt32?, queryHeads: UInt32?, headDim: UInt32?) -> ModelGeometry {
        guard let kvHeads, let queryHeads, let headDim,
            let geometry = try? ModelGeometry(
                name: "claimed",
                layers: 512,
                queryHeads: Int(queryHeads),
                kvHeads: Int(kvHeads),
                headDim: Int(headDim),
                tokensPerImage: 1
            )
        else { return Seeds.geometry }
        return geometry
    }

    private static func prefill(
        _ message: Tessera_V1_LayerTensors,
        _ geometry: ModelGeometry,
        _ promptLength: Int
    )
        throws(WireError)
    {
        let value = try LayerPrefill(proto: message, geometry: geometry, promptLength: promptLength)
        reencodes(value.keys + value.values + [value.queries], "layer \(message.layer) prefill") {
            _ throws(WireError) in
            let again = try LayerPrefill(
                proto: value.proto(layer: Int(message.layer)),
                geometry: geometry,
                promptLength: promptLength
            )
            return again.keys + again.values + [again.queries]
        }
    }

    private static func decodeStep(_ message: Tessera_V1_LayerDecode) throws(WireError) {
        let geometry = Self.geometry(
            kvHeads: message.keys.shape.first,
            queryHeads: message.queries.shape.first,
            headDim: message.keys.shape.last
        )
        let value = try DecodeStepInput(proto: message, geometry: geometry)
        reencodes([value.keys, value.values, value.queries], "layer \(message.layer) decode") { _ throws(WireError) in
            let again = try DecodeStepInput(
                proto: value.proto(layer: Int(message.layer), geometry: geometry),
                geometry: geometry
            )
            return [again.keys, again.values, again.queries]
        }
    }

    private static func output(_ message: Tessera_V1_LayerOutput) throws(WireError) {
        let geometry = Self.geometry(
            kvHeads: 1,
            queryHeads: message.output.shape.first,
            headDim: message.output.shape.last
        )
        let values = try message.outputValues(geometry: geometry)
        reencodes(values, "layer \(message.layer) output") { values throws(WireError) in
            try Tessera_V1_LayerOutput(layer: Int(message.layer), output: values, geometry: geometry)
                .outputValues(geometry: geometry)
        }
    }

    /// One head of a shard copy, as `IncomingShard.take` reads it: rows in the tensors' own dtype.
    private static func head(_ message: Tessera_V1_HeadState) throws(WireError) {
        let headDim = Int(message.keys.shape.last ?? UInt32(Seeds.geometry.headDim))
        let tags = message.tags.map(ModalityTag.init(rawValue:))
        let rows: Int?
        switch message.keys.dtype {
        case .float16:
            rows =
                HeadCache(
                    headDim: headDim,
                    keys: try message.keys.float16Values(name: "keys"),
                    values: try message.values.float16Values(name: "values"),
                    positions: message.positions,
                    tags: tags
                )?.count
        default:
            rows =
                HeadCache(
                    headDim: headDim,
                    keys: try message.keys.floatValues(name: "keys"),
                    values: try message.values.floatValues(name: "values"),
                    positions: message.positions,
                    tags: tags
                )?.count
        }
        guard let rows else {
            throw WireError(.invalidShape, "keys, values, positions and tags disagree on the row count")
        }
        guard message.rowScores.count <= rows else {
            throw WireError(.invalidShape, "\(message.rowScores.count) row scores for \(rows) rows")
        }
    }

    // MARK: Envelopes

    /// Nodes re-send what they receive, so a parsed envelope must serialize, and parse back to the
    /// same bytes.
    private static func checkReencoding(_ envelope: Tessera_V1_Envelope) {
        do {
            let first = try envelope.serializedFrame()
            let second = try Tessera_V1_Envelope(frame: first).serializedFrame()
            precondition(first == second, "a \(envelope.bodyName) envelope serializes differently after a round trip")
        } catch {
            preconditionFailure("a parsed \(envelope.bodyName) envelope does not re-encode: \(error)")
        }
    }
}

/// A value a conversion accepted must encode, and decode to itself: else a node could accept what it
/// cannot pass on, or pass on something else.
private func reencodes<Value: Equatable, Failure: Error>(
    _ value: Value,
    _ what: String,
    _ again: (Value) throws(Failure) -> Value
) {
    do {
        let decoded = try again(value)
        precondition(decoded == value, "\(what) changed on re-encoding: \(value) became \(decoded)")
    } catch {
        preconditionFailure("\(what) was accepted from the wire but does not re-encode: \(error)")
    }
}

import ClusterWire
import Testing

/// One populated example of every Envelope body, for round-trip tests.
struct EnvelopeSample: Sendable, CustomTestStringConvertible {
    var body: Tessera_V1_Envelope.OneOf_Body
    var testDescription: String { self.body.name }
}

/// Every body name in `envelope.proto`'s `oneof body`. Update with the proto.
let allBodyNames: Set<String> = [
    "hello", "hello_ack", "error",
    "register_worker", "register_ack", "heartbeat", "heartbeat_ack", "status_request", "status_reply",
    "open_sequence", "placement_request", "placement", "placement_moved", "close", "close_ack",
    "layer_stats", "assign_budget", "budget_applied",
    "prefill", "prefill_ack", "decode", "decode_result",
]

private func endpoint(_ id: String, _ port: UInt32) -> Tessera_V1_Endpoint {
    var endpoint = Tessera_V1_Endpoint()
    endpoint.nodeID = id
    endpoint.host = "127.0.0.1"
    endpoint.port = port
    return endpoint
}

private func modalityBytes() -> [Tessera_V1_ModalityBytes] {
    [(Tessera_V1_ModalityKind.text, UInt64(4096)), (.image, 65536), (.videoFrame, 1 << 33)].map {
        var entry = Tessera_V1_ModalityBytes()
        entry.kind = $0.0
        entry.bytes = $0.1
        return entry
    }
}

private func geometry() -> Tessera_V1_ModelGeometry {
    var model = Tessera_V1_ModelGeometry()
    model.name = "tiny"
    model.layers = 6
    model.queryHeads = 4
    model.kvHeads = 2
    model.headDim = 32
    model.tokensPerImage = 64
    return model
}

private func spans() -> [Tessera_V1_ModalitySpan] {
    [
        (Tessera_V1_ModalityKind.text, UInt32(0), UInt32(0), UInt32(5)), (.image, 0, 5, 64), (.videoFrame, 3, 69, 64),
        (.text, 0, 133, 7),
    ]
    .map {
        var span = Tessera_V1_ModalitySpan()
        span.kind = $0.0
        span.index = $0.1
        span.start = $0.2
        span.count = $0.3
        return span
    }
}

private func policy() -> Tessera_V1_Policy {
    var policy = Tessera_V1_Policy()
    policy.name = "madakv"
    policy.retention = 0.25
    policy.settings = [("window", "32"), ("merge", "look-m")].map {
        var setting = Tessera_V1_PolicySetting()
        setting.key = $0.0
        setting.value = $0.1
        return setting
    }
    return policy
}

private func tensor(_ shape: [Int], float16: Bool = false, offset: Float = 0) -> Tessera_V1_Tensor {
    let count = shape.reduce(1, *)
    let values = (0..<count).map { Float($0 % 97) * 0.125 - 3 + offset }
    if float16 {
        return try! Tessera_V1_Tensor(float16Converting: values, shape: shape)
    }
    return try! Tessera_V1_Tensor(float32: values, shape: shape)
}

let envelopeSamples: [EnvelopeSample] = {
    var bodies: [Tessera_V1_Envelope.OneOf_Body] = []

    var hello = Tessera_V1_Hello()
    hello.protocolVersion = 1
    hello.role = .worker
    hello.nodeID = "worker-1"
    hello.incarnation = 0xDEAD_BEEF_0000_0001
    bodies.append(.hello(hello))

    var helloAck = Tessera_V1_HelloAck()
    helloAck.protocolVersion = 1
    helloAck.role = .coordinator
    helloAck.nodeID = "coordinator"
    helloAck.incarnation = 42
    bodies.append(.helloAck(helloAck))

    bodies.append(.error(WireError(.staleEpoch, "epoch 3 < 4", retryAfter: .milliseconds(250)).proto))

    var register = Tessera_V1_RegisterWorker()
    register.endpoint = endpoint("worker-1", 7001)
    register.incarnation = 7
    register.memoryCapacityBytes = 8 << 30
    var held = Tessera_V1_HeldShard()
    held.assignment.sequenceID = UInt64.max
    held.assignment.epoch = 9
    held.assignment.shard.shardID = 3
    held.assignment.decodeTokens = 32
    held.compressed = true
    held.kvBytes = 123_456
    register.heldShards = [held, Tessera_V1_HeldShard()]
    bodies.append(.registerWorker(register))

    var registerAck = Tessera_V1_RegisterAck()
    registerAck.coordinatorID = "coordinator"
    registerAck.coordinatorIncarnation = 2
    registerAck.heartbeatIntervalMillis = 500
    bodies.append(.registerAck(registerAck))

    var heartbeat = Tessera_V1_Heartbeat()
    heartbeat.incarnation = 7
    heartbeat.sequenceNumber = 99
    heartbeat.kvBytes = 1 << 20
    heartbeat.kvBytesByModality = modalityBytes()
    bodies.append(.heartbeat(heartbeat))

    var heartbeatAck = Tessera_V1_HeartbeatAck()
    heartbeatAck.sequenceNumber = 99
    bodies.append(.heartbeatAck(heartbeatAck))

    var statusRequest = Tessera_V1_StatusRequest()
    statusRequest.includeSequences = true
    bodies.append(.statusRequest(statusRequest))

    var worker = Tessera_V1_WorkerStatus()
    worker.endpoint = endpoint("worker-2", 7002)
    worker.incarnation = 3
    worker.state = .suspect
    worker.primaryShards = 2
    worker.replicaShards = 1
    worker.kvBytes = 777
    worker.kvBytesByModality = modalityBytes()
    worker.memoryCapacityBytes = 1 << 30
    var sequence = Tessera_V1_SequenceStatus()
    sequence.tenant = "acme"
    sequence.sequenceID = 5
    sequence.state = .decoding
    sequence.promptLength = 140
    sequence.kvBytes = 4242
    var statusReply = Tessera_V1_StatusReply()
    statusReply.coordinatorID = "coordinator"
    statusReply.membershipVersion = 11
    statusReply.workers = [worker]
    statusReply.sequences = [sequence]
    statusReply.sequenceCount = 1
    statusReply.totalKvBytes = 777
    statusReply.memoryCapacityBytes = 1 << 34
    bodies.append(.statusReply(statusReply))

    var open = Tessera_V1_OpenSequence()
    open.tenant = "acme"
    open.sequenceID = 5
    open.model = geometry()
    open.spans = spans()
    open.policy = policy()
    bodies.append(.openSequence(open))

    var placementRequest = Tessera_V1_PlacementRequest()
    placementRequest.tenant = "acme"
    placementRequest.sequenceID = 5
    bodies.append(.placementRequest(placementRequest))

    var placement = Tessera_V1_Placement()
    placement.sequenceID = 5
    placement.epoch = 11
    placement.shards = (0..<3).map { index in
        var shard = Tessera_V1_ShardPlacement()
        shard.shardID = UInt32(index)
        shard.firstLayer = UInt32(index * 2)
        shard.layerCount = 2
        shard.primary = endpoint("worker-\(index)", 7000 + UInt32(index))
        shard.replicas = [endpoint("worker-\(index + 1)", 7001 + UInt32(index))]
        return shard
    }
    bodies.append(.placement(placement))

    var moved = Tessera_V1_PlacementMoved()
    moved.placement = placement
    bodies.append(.placementMoved(moved))

    var close = Tessera_V1_Close()
    close.tenant = "acme"
    close.sequenceID = 5
    bodies.append(.close(close))

    var closeAck = Tessera_V1_CloseAck()
    closeAck.sequenceID = 5
    closeAck.freedBytes = 4242
    bodies.append(.closeAck(closeAck))

    var stats = Tessera_V1_LayerStats()
    stats.sequenceID = 5
    stats.layer = 3
    stats.promptLength = 140
    stats.density = 0.0625
    stats.epoch = 11
    stats.heads = (0..<2).map { head in
        var h = Tessera_V1_HeadStats()
        h.visualMass = 0.7 + Double(head) * 0.01
        h.textMass = 0.3 - Double(head) * 0.01
        h.visualDemand = 12
        h.textDemand = 3
        h.jointDemand = 14
        h.visualCount = 128
        h.textCount = 12
        return h
    }
    bodies.append(.layerStats(stats))

    var assign = Tessera_V1_AssignBudget()
    assign.sequenceID = 5
    assign.epoch = 11
    assign.layers = (2..<4).map { layer in
        var budget = Tessera_V1_LayerBudget()
        budget.layer = UInt32(layer)
        budget.heads = (0..<2).map { head in
            var h = Tessera_V1_HeadBudget()
            h.capacity = 35 + UInt32(head)
            h.split.visual = 20
            h.split.text = 15 + UInt32(head)
            return h
        }
        return budget
    }
    bodies.append(.assignBudget(assign))

    var applied = Tessera_V1_BudgetApplied()
    applied.sequenceID = 5
    applied.shardID = 1
    applied.epoch = 11
    applied.kvBytes = 1000
    applied.kvBytesByModality = modalityBytes()
    bodies.append(.budgetApplied(applied))

    var prefill = Tessera_V1_Prefill()
    prefill.tenant = "acme"
    prefill.sequenceID = 5
    prefill.shardID = 1
    prefill.epoch = 11
    prefill.model = geometry()
    prefill.spans = spans()
    prefill.policy = policy()
    var inline = Tessera_V1_InlineTensors()
    inline.layers = (2..<4).map { layer in
        var tensors = Tessera_V1_LayerTensors()
        tensors.layer = UInt32(layer)
        tensors.keys = tensor([2, 140, 32], float16: true)
        tensors.values = tensor([2, 140, 32], float16: true, offset: 1)
        tensors.queries = tensor([4, 8, 32])
        return tensors
    }
    prefill.source = .inlineTensors(inline)
    bodies.append(.prefill(prefill))

    var prefillAck = Tessera_V1_PrefillAck()
    prefillAck.sequenceID = 5
    prefillAck.shardID = 1
    prefillAck.epoch = 11
    prefillAck.kvBytes = 71680
    bodies.append(.prefillAck(prefillAck))

    var decode = Tessera_V1_Decode()
    decode.tenant = "acme"
    decode.sequenceID = 5
    decode.shardID = 1
    decode.epoch = 11
    decode.step = 17
    decode.layers = (2..<4).map { layer in
        var step = Tessera_V1_LayerDecode()
        step.layer = UInt32(layer)
        step.keys = tensor([2, 1, 32])
        step.values = tensor([2, 1, 32], offset: 0.5)
        step.queries = tensor([4, 1, 32], offset: -0.5)
        return step
    }
    bodies.append(.decode(decode))

    var result = Tessera_V1_DecodeResult()
    result.sequenceID = 5
    result.shardID = 1
    result.step = 17
    result.outputs = (2..<4).map { layer in
        var output = Tessera_V1_LayerOutput()
        output.layer = UInt32(layer)
        output.output = tensor([4, 1, 32])
        return output
    }
    bodies.append(.decodeResult(result))

    return bodies.map(EnvelopeSample.init)
}()

/// A synthetic-source prefill, to cover the other arm of `Prefill.source`.
let syntheticPrefill: Tessera_V1_Envelope.OneOf_Body = {
    var prefill = Tessera_V1_Prefill()
    prefill.tenant = "acme"
    prefill.sequenceID = 6
    prefill.shardID = 0
    prefill.epoch = 11
    prefill.model = geometry()
    prefill.spans = spans()
    prefill.policy = policy()
    var source = Tessera_V1_SyntheticSource()
    source.workload = "single-image-qa"
    source.seed = 0x5EED
    source.sequenceIndex = 12
    prefill.source = .synthetic(source)
    return .prefill(prefill)
}()

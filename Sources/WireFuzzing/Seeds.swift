import ClusterWire
import KVCacheCore
import NIOCore
import Workloads

extension WireFuzzing {
    /// One valid frame (4-byte length and Envelope) of every body type, named after the body's proto
    /// field ("open_sequence"); more for bodies with several shapes ("prefill-synthetic",
    /// "shard_transfer-layer") and for a request in a trace ("decode-traced"); and "stream", all of
    /// them back to back. Every seed passes every check `run` applies, so mutations start from the
    /// deepest paths. `Fuzz/Corpus/` holds them as files (`scripts/fuzz.sh seed` writes them).
    public static func seedCorpus() -> [(name: String, bytes: [UInt8])] {
        let seeds: [(name: String, bytes: [UInt8])]
        do {
            seeds = try Seeds.bodies().enumerated().map { index, seed in
                var frame = ByteBuffer()
                var envelope = Tessera_V1_Envelope(requestID: UInt64(index), seed.body)
                if seed.variant == "traced" { envelope.traceContext = Seeds.traceContext }
                try FrameEncoder().encode(data: try envelope.serializedFrame(), out: &frame)
                let name = seed.variant.map { "\(seed.body.name)-\($0)" } ?? seed.body.name
                return (name, Array(frame.readableBytesView))
            }
        } catch {
            preconditionFailure("the seeds are built from fixed valid values, yet: \(error)")
        }
        return seeds + [("stream", seeds.flatMap(\.bytes))]
    }
}

/// The values the seeds are built from: a `tiny` model and a 16-position prompt (text, an image,
/// text), small enough that the fuzzer runs fast.
enum Seeds {
    static let geometry = ModelGeometry.tiny
    /// What a sender in an OpenTelemetry trace adds to its requests (W3C trace context).
    static let traceContext = [
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": "vendor=opaque",
    ]

    static let layout: PromptLayout = {
        do {
            return try PromptLayout(spans: [
                ModalitySpan(.text, start: 0, count: 4),
                ModalitySpan(.image(0), start: 4, count: 8),
                ModalitySpan(.text, start: 12, count: 4),
            ])
        } catch {
            preconditionFailure("the seed layout tiles its prompt: \(error)")
        }
    }()

    /// Every body; a variant names a second shape of the same body type.
    static func bodies() throws(WireError) -> [(body: Tessera_V1_Envelope.OneOf_Body, variant: String?)] {
        let hello = Handshakes.workerToCoordinator.hello()
        let accepted = try Handshakes.coordinator.acceptHello(hello)
        let kvShape = [geometry.kvHeads, layout.promptLength, geometry.headDim]
        let queryRows = 4
        let prefill = try self.core { () throws(KVCacheError) in
            try LayerPrefill(
                geometry: geometry,
                promptLength: layout.promptLength,
                keys: values(kvShape.reduce(1, *)),
                values: values(kvShape.reduce(1, *), offset: 1),
                queries: values(geometry.queryHeads * queryRows * geometry.headDim, offset: -1),
                queryRows: queryRows
            )
        }
        let step = try self.core { () throws(KVCacheError) in
            try DecodeStepInput(
                geometry: geometry,
                keys: values(geometry.kvHeads * geometry.headDim),
                values: values(geometry.kvHeads * geometry.headDim, offset: 0.5),
                queries: values(geometry.queryHeads * geometry.headDim, offset: -0.5)
            )
        }
        let statistics = LayerStatistics(
            layer: 2,
            promptLength: layout.promptLength,
            density: 0.25,
            heads: (0..<geometry.kvHeads).map { head in
                HeadModalityStatistics(
                    visualMass: 0.6 + Double(head) / 10,
                    textMass: 0.4 - Double(head) / 10,
                    visualDemand: 5,
                    textDemand: 3,
                    jointDemand: 7,
                    visualCount: 8,
                    textCount: 8
                )
            }
        )
        let budgets = (2..<4).map { layer in
            LayerBudget(
                layer: layer,
                heads: [HeadBudget(capacity: 8, split: ModalitySplit(visual: 5, text: 3)), HeadBudget(capacity: 6)]
            )
        }
        let sequenceID: UInt64 = 5
        let epoch: UInt64 = 11
        var bodies: [(body: Tessera_V1_Envelope.OneOf_Body, variant: String?)] = []
        func add(_ body: Tessera_V1_Envelope.OneOf_Body, _ variant: String? = nil) {
            bodies.append((body, variant))
        }

        add(hello.body!)
        add(Handshakes.coordinator.helloAck(for: accepted).body!)
        add(.error(WireError(.staleEpoch, "epoch 10 is behind 11", retryAfter: .milliseconds(250)).proto))

        var register = Tessera_V1_RegisterWorker()
        register.endpoint = endpoint("worker-1", 7001)
        register.incarnation = 7
        register.memoryCapacityBytes = 8 << 30
        var held = Tessera_V1_HeldShard()
        held.assignment = try assignment(sequenceID, epoch, policy: "snapkv")
        held.compressed = true
        held.kvBytes = 65536
        register.heldShards = [held]
        add(.registerWorker(register))

        var registerAck = Tessera_V1_RegisterAck()
        registerAck.coordinatorID = "coordinator"
        registerAck.coordinatorIncarnation = 2
        registerAck.heartbeatIntervalMillis = 500
        add(.registerAck(registerAck))

        var heartbeat = Tessera_V1_Heartbeat()
        heartbeat.incarnation = 7
        heartbeat.sequenceNumber = 99
        heartbeat.kvBytes = 1 << 20
        heartbeat.kvBytesByModality = byModality()
        heartbeat.rssBytes = 1 << 28
        heartbeat.liveSequences = 1
        add(.heartbeat(heartbeat))

        var heartbeatAck = Tessera_V1_HeartbeatAck()
        heartbeatAck.sequenceNumber = 99
        add(.heartbeatAck(heartbeatAck))

        var leave = Tessera_V1_LeaveCluster()
        leave.incarnation = 7
        add(.leaveCluster(leave))
        var leaveAck = Tessera_V1_LeaveAck()
        leaveAck.sequencesMoved = 3
        add(.leaveAck(leaveAck))

        var statusRequest = Tessera_V1_StatusRequest()
        statusRequest.includeSequences = true
        add(.statusRequest(statusRequest))

        var worker = Tessera_V1_WorkerStatus()
        worker.endpoint = endpoint("worker-1", 7001)
        worker.incarnation = 7
        worker.state = .up
        worker.primaryShards = 1
        worker.kvBytes = 1 << 20
        worker.kvBytesByModality = byModality()
        worker.memoryCapacityBytes = 8 << 30
        worker.liveSequences = 1
        var sequence = Tessera_V1_SequenceStatus()
        sequence.tenant = "acme"
        sequence.sequenceID = sequenceID
        sequence.state = .decoding
        sequence.promptLength = UInt32(layout.promptLength)
        sequence.kvBytes = 1 << 20
        sequence.primary = true
        var status = Tessera_V1_StatusReply()
        status.coordinatorID = "coordinator"
        status.membershipVersion = 3
        status.workers = [worker]
        status.sequences = [sequence]
        status.sequenceCount = 1
        status.totalKvBytes = 1 << 20
        add(.statusReply(status))

        var open = Tessera_V1_OpenSequence()
        open.tenant = "acme"
        open.sequenceID = sequenceID
        open.model = try geometry.proto()
        open.spans = try layout.proto()
        open.policy = try policy("vl-cache")
        open.decodeTokens = 8
        add(.openSequence(open))

        var placementRequest = Tessera_V1_PlacementRequest()
        placementRequest.tenant = "acme"
        placementRequest.sequenceID = sequenceID
        add(.placementRequest(placementRequest))

        var placement = Tessera_V1_Placement()
        placement.sequenceID = sequenceID
        placement.epoch = epoch
        placement.shards = [shard()]
        add(.placement(placement))

        var moved = Tessera_V1_PlacementMoved()
        moved.placement = placement
        add(.placementMoved(moved))

        var close = Tessera_V1_Close()
        close.tenant = "acme"
        close.sequenceID = sequenceID
        add(.close(close))

        var closeAck = Tessera_V1_CloseAck()
        closeAck.sequenceID = sequenceID
        closeAck.freedBytes = 1 << 20
        add(.closeAck(closeAck))

        add(.shardAssignment(try assignment(sequenceID, epoch, policy: "madakv")))

        var assignmentAck = Tessera_V1_ShardAssignmentAck()
        assignmentAck.sequenceID = sequenceID
        add(.shardAssignmentAck(assignmentAck))

        add(.layerStats(try statistics.proto(sequenceID: sequenceID, epoch: epoch)))
        add(.assignBudget(try budgets.proto(sequenceID: sequenceID, epoch: epoch)))

        var applied = Tessera_V1_BudgetApplied()
        applied.sequenceID = sequenceID
        applied.epoch = epoch
        applied.kvBytes = 1 << 20
        applied.kvBytesByModality = byModality()
        applied.headRowShares = HeadRowShares(min: 0.1, max: 0.1).proto
        add(.budgetApplied(applied))

        var inline = Tessera_V1_Prefill()
        inline.tenant = "acme"
        inline.sequenceID = sequenceID
        inline.epoch = epoch
        inline.model = try geometry.proto()
        inline.spans = try layout.proto()
        inline.policy = try policy("look-m")
        var tensors = Tessera_V1_InlineTensors()
        // Keys and values in float16, queries in float32: both element types.
        tensors.layers = [try prefill.proto(layer: 2, scalarType: .float16, queryScalarType: .float32)]
        inline.source = .inlineTensors(tensors)
        add(.prefill(inline))

        var synthetic = inline
        var source = Tessera_V1_SyntheticSource()
        source.workload = WorkloadPreset.imageQA.rawValue
        source.seed = 0x5EED
        source.sequenceIndex = 3
        source.shape = TraceSettings.defaults.shape
        synthetic.source = .synthetic(source)
        add(.prefill(synthetic), "synthetic")

        var prefillAck = Tessera_V1_PrefillAck()
        prefillAck.sequenceID = sequenceID
        prefillAck.epoch = epoch
        prefillAck.kvBytes = 1 << 20
        add(.prefillAck(prefillAck))

        var decode = Tessera_V1_Decode()
        decode.tenant = "acme"
        decode.sequenceID = sequenceID
        decode.epoch = epoch
        decode.step = 1
        decode.layers = [try step.proto(layer: 2, geometry: geometry)]
        add(.decode(decode))
        add(.decode(decode), "traced")

        var result = Tessera_V1_DecodeResult()
        result.sequenceID = sequenceID
        result.step = 1
        result.outputs = [
            try Tessera_V1_LayerOutput(
                layer: 2,
                output: values(geometry.queryHeads * geometry.headDim),
                geometry: geometry
            )
        ]
        result.kvBytes = 1 << 18
        result.fullKvBytes = 1 << 20
        result.synthesisMicros = 1500
        result.profileMicros = 2500
        result.compressMicros = 700
        result.headRowShares = HeadRowShares(min: 0.05, max: 0.3).proto
        add(.decodeResult(result))

        var copy = Tessera_V1_CopyShard()
        copy.sequenceID = sequenceID
        copy.epoch = epoch
        copy.target = endpoint("worker-3", 7003)
        add(.copyShard(copy))

        var copyAck = Tessera_V1_CopyShardAck()
        copyAck.sequenceID = sequenceID
        copyAck.digest = 0xD16E57
        copyAck.kvBytes = 1 << 18
        copyAck.transferredBytes = 1 << 18
        add(.copyShardAck(copyAck))

        var begin = Tessera_V1_ShardTransferBegin()
        begin.assignment = try assignment(sequenceID, epoch, policy: "pyramidkv")
        begin.storage = .float16
        begin.nextStep = 1
        begin.lastResult = result
        begin.layers = 1
        begin.statistics = [try statistics.proto(sequenceID: sequenceID, epoch: epoch)]
        add(.shardTransfer(transfer(sequenceID, .begin(begin))))

        var layer = Tessera_V1_ShardLayerState()
        layer.layer = 2
        let rows: [(position: Int32, tag: ModalityTag)] = [(0, .text), (5, ModalityTag(.image(0))), (15, .text)]
        layer.heads = try (0..<geometry.kvHeads).map { head throws(WireError) in
            var state = Tessera_V1_HeadState()
            let shape = [rows.count, geometry.headDim]
            state.keys = try Tessera_V1_Tensor(
                float16Converting: values(rows.count * geometry.headDim, offset: Float(head)),
                shape: shape
            )
            state.values = try Tessera_V1_Tensor(
                float16Converting: values(rows.count * geometry.headDim, offset: -Float(head)),
                shape: shape
            )
            state.positions = rows.map(\.position)
            state.tags = rows.map(\.tag.rawValue)
            state.rowScores = [0.5, 0.25, 0.125]
            return state
        }
        layer.syntheticDecode = [try step.proto(layer: 2, geometry: geometry)]
        add(.shardTransfer(transfer(sequenceID, .layer(layer))), "layer")

        var commit = Tessera_V1_ShardTransferCommit()
        commit.digest = 0xD16E57
        add(.shardTransfer(transfer(sequenceID, .commit(commit))), "commit")

        var transferAck = Tessera_V1_ShardTransferAck()
        transferAck.sequenceID = sequenceID
        transferAck.digest = 0xD16E57
        add(.shardTransferAck(transferAck))

        return bodies
    }

    // MARK: Parts

    /// Runs a constructor of the core with constant arguments.
    private static func core<Value>(_ body: () throws(KVCacheError) -> Value) throws(WireError) -> Value {
        do {
            return try body()
        } catch {
            throw WireError(.internal, "seed: \(error.message)")
        }
    }

    /// `count` finite values, varied enough that float16 rounding and the profile have work.
    private static func values(_ count: Int, offset: Float = 0) -> [Float] {
        (0..<count).map { Float($0 % 17) * 0.25 - 2 + offset }
    }

    private static func endpoint(_ nodeID: String, _ port: UInt32) -> Tessera_V1_Endpoint {
        var endpoint = Tessera_V1_Endpoint()
        endpoint.nodeID = nodeID
        endpoint.host = "127.0.0.1"
        endpoint.port = port
        return endpoint
    }

    private static func byModality() -> [Tessera_V1_ModalityBytes] {
        [Tessera_V1_ModalityBytes](byModality: ModalityBytes(text: 4096, image: 65536, video: 1 << 20))
    }

    /// The policy with its defaults, every setting spelled out.
    private static func policy(_ name: String) throws(WireError) -> Tessera_V1_Policy {
        let policy = try CompressionPolicy(name: name, wireSettings: [])
        return try policy.proto(retention: 0.1)
    }

    /// One shard holding every layer, with one replica.
    private static func shard() -> Tessera_V1_ShardPlacement {
        var shard = Tessera_V1_ShardPlacement()
        shard.firstLayer = 0
        shard.layerCount = UInt32(geometry.layers)
        shard.primary = endpoint("worker-1", 7001)
        shard.replicas = [endpoint("worker-2", 7002)]
        return shard
    }

    private static func assignment(
        _ sequenceID: UInt64,
        _ epoch: UInt64,
        policy name: String
    ) throws(WireError)
        -> Tessera_V1_ShardAssignment
    {
        var assignment = Tessera_V1_ShardAssignment()
        assignment.tenant = "acme"
        assignment.sequenceID = sequenceID
        assignment.epoch = epoch
        assignment.shard = shard()
        assignment.model = try geometry.proto()
        assignment.spans = try layout.proto()
        assignment.policy = try policy(name)
        assignment.decodeTokens = 8
        return assignment
    }

    private static func transfer(
        _ sequenceID: UInt64,
        _ part: Tessera_V1_ShardTransfer.OneOf_Part
    )
        -> Tessera_V1_ShardTransfer
    {
        var transfer = Tessera_V1_ShardTransfer()
        transfer.sequenceID = sequenceID
        transfer.part = part
        return transfer
    }
}

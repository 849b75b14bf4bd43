package import KVCacheCore

// The gather-allocate-scatter messages: `LayerStatistics` <-> `tessera.v1.LayerStats` and
// `[LayerBudget]` <-> `tessera.v1.AssignBudget`.
//
// A `HeadBudget`'s optional `split` travels as the optional `ModalitySplit split` message field:
// absent means `nil` (the policy ranks both modalities together), present means that split, even
// when it is 0 visual and 0 text rows (a head that keeps only its window). So `nil` and a zero split
// stay distinct and every budget round-trips exactly.

// MARK: - Statistics

extension HeadModalityStatistics {
    /// Checks the invariants every statistics computed by the core satisfies: finite, non-negative
    /// masses, non-negative counts, each demand at most the positions it ranks, and at most
    /// `promptLength` compressible positions.
    package func validate(promptLength: Int, field: String = "head") throws(WireError) {
        for (name, mass) in [("visualMass", visualMass), ("textMass", textMass)] {
            guard mass.isFinite, mass >= 0 else {
                throw WireError(.invalidValue, "\(field).\(name) must be finite and ≥ 0, got \(mass)")
            }
        }
        for (name, count) in [("visualCount", visualCount), ("textCount", textCount)] {
            guard count >= 0 else { throw WireError(.invalidValue, "\(field).\(name) must be ≥ 0, got \(count)") }
        }
        guard visualCount + textCount <= promptLength else {
            throw WireError(
                .invalidValue,
                "\(field): visualCount + textCount must be at most promptLength \(promptLength), got "
                    + "\(visualCount) + \(textCount)"
            )
        }
        let demands = [
            ("visualDemand", visualDemand, visualCount, "visualCount"),
            ("textDemand", textDemand, textCount, "textCount"),
            ("jointDemand", jointDemand, visualCount + textCount, "visualCount + textCount"),
        ]
        for (name, demand, limit, limitName) in demands {
            guard (0...limit).contains(demand) else {
                throw WireError(
                    .invalidValue,
                    "\(field).\(name) must be in 0...\(limitName) = 0...\(limit), got \(demand)"
                )
            }
        }
    }

    /// The statistics a peer sent, checked with `validate(promptLength:field:)`.
    package init(proto: Tessera_V1_HeadStats, promptLength: Int, field: String = "head") throws(WireError) {
        self.init(uncheckedProto: proto)
        try self.validate(promptLength: promptLength, field: field)
    }

    /// The fields as they arrived; the caller validates.
    fileprivate init(uncheckedProto proto: Tessera_V1_HeadStats) {
        self.init(
            visualMass: proto.visualMass,
            textMass: proto.textMass,
            visualDemand: Int(proto.visualDemand),
            textDemand: Int(proto.textDemand),
            jointDemand: Int(proto.jointDemand),
            visualCount: Int(proto.visualCount),
            textCount: Int(proto.textCount)
        )
    }

    /// The statistics as a message, after `validate(promptLength:field:)`.
    package func proto(promptLength: Int, field: String = "head") throws(WireError) -> Tessera_V1_HeadStats {
        try self.validate(promptLength: promptLength, field: field)
        var message = Tessera_V1_HeadStats()
        message.visualMass = self.visualMass
        message.textMass = self.textMass
        message.visualDemand = try wireUInt32(self.visualDemand, field: "\(field).visualDemand")
        message.textDemand = try wireUInt32(self.textDemand, field: "\(field).textDemand")
        message.jointDemand = try wireUInt32(self.jointDemand, field: "\(field).jointDemand")
        message.visualCount = try wireUInt32(self.visualCount, field: "\(field).visualCount")
        message.textCount = try wireUInt32(self.textCount, field: "\(field).textCount")
        return message
    }
}

extension LayerStatistics {
    /// Checks: layer ≥ 0 (and below `geometry.layers` when given), promptLength ≥ 1, density finite
    /// in [0, 1], every head valid, and when `geometry` is given, no heads or one per KV head.
    package func validate(geometry: ModelGeometry? = nil, field: String = "stats") throws(WireError) {
        let layers = geometry.map { "0..<\($0.layers)" } ?? "0...\(UInt32.max)"
        guard layer >= 0, layer <= Int(UInt32.max), geometry.map({ layer < $0.layers }) ?? true else {
            throw WireError(.invalidValue, "\(field).layer must be in \(layers), got \(layer)")
        }
        guard promptLength >= 1, promptLength <= Int(UInt32.max) else {
            throw WireError(.invalidValue, "\(field).promptLength must be in 1...\(UInt32.max), got \(promptLength)")
        }
        guard density.isFinite, (0...1).contains(density) else {
            throw WireError(.invalidValue, "\(field).density must be in [0, 1], got \(density)")
        }
        if let geometry, !heads.isEmpty, heads.count != geometry.kvHeads {
            throw WireError(
                .invalidShape,
                "\(field).heads must be empty or hold one entry per KV head (\(geometry.kvHeads)), got \(heads.count)"
            )
        }
        for (index, head) in heads.enumerated() {
            try head.validate(promptLength: promptLength, field: "\(field).heads[\(index)]")
        }
    }

    /// The statistics a peer sent; the message's `sequence_id` and `epoch` are the caller's to check.
    ///
    /// - Parameter geometry: when given, also checks the layer and the head count against it.
    /// - Throws: `.invalidValue`/`.invalidShape` as `validate(geometry:field:)`.
    package init(
        proto: Tessera_V1_LayerStats,
        geometry: ModelGeometry? = nil,
        field: String = "stats"
    ) throws(WireError) {
        self.init(
            layer: Int(proto.layer),
            promptLength: Int(proto.promptLength),
            density: proto.density,
            heads: proto.heads.map(HeadModalityStatistics.init(uncheckedProto:))
        )
        try self.validate(geometry: geometry, field: field)
    }

    /// The statistics as the message a worker sends for `sequenceID` under shard-map `epoch`.
    ///
    /// - Throws: as `validate(geometry:field:)`.
    package func proto(
        sequenceID: UInt64,
        epoch: UInt64,
        field: String = "stats"
    ) throws(WireError)
        -> Tessera_V1_LayerStats
    {
        try self.validate(field: field)
        var message = Tessera_V1_LayerStats()
        message.sequenceID = sequenceID
        message.epoch = epoch
        message.layer = UInt32(self.layer)
        message.promptLength = UInt32(self.promptLength)
        message.density = self.density
        message.heads = []
        message.heads.reserveCapacity(self.heads.count)
        for (index, head) in self.heads.enumerated() {
            message.heads.append(try head.proto(promptLength: self.promptLength, field: "\(field).heads[\(index)]"))
        }
        return message
    }
}

// MARK: - Budgets

extension HeadBudget {
    /// Checks: capacity ≥ 1 (the compressor needs one row per head); a split's counts ≥ 0 and
    /// together at most the capacity.
    package func validate(field: String = "head") throws(WireError) {
        guard capacity >= 1, capacity <= Int(UInt32.max) else {
            throw WireError(.invalidValue, "\(field).capacity must be in 1...\(UInt32.max), got \(capacity)")
        }
        if let split {
            guard split.visual >= 0, split.text >= 0, split.visual + split.text <= capacity else {
                throw WireError(
                    .invalidValue,
                    "\(field).split must have visual ≥ 0, text ≥ 0 and visual + text ≤ capacity \(capacity), got "
                        + "visual \(split.visual), text \(split.text)"
                )
            }
        }
    }

    /// The budget a peer sent: an absent `split` is `nil`, a present one that split (see the file
    /// comment).
    package init(proto: Tessera_V1_HeadBudget, field: String = "head") throws(WireError) {
        self.init(
            capacity: Int(proto.capacity),
            split: proto.hasSplit ? ModalitySplit(visual: Int(proto.split.visual), text: Int(proto.split.text)) : nil
        )
        try self.validate(field: field)
    }

    /// The budget as a message, after `validate(field:)`.
    package func proto(field: String = "head") throws(WireError) -> Tessera_V1_HeadBudget {
        try self.validate(field: field)
        var message = Tessera_V1_HeadBudget()
        message.capacity = UInt32(self.capacity)
        if let split {
            var wire = Tessera_V1_ModalitySplit()
            wire.visual = UInt32(split.visual)
            wire.text = UInt32(split.text)
            message.split = wire
        }
        return message
    }
}

extension LayerBudget {
    /// Checks: layer ≥ 0 (and below `geometry.layers` when given), at least one head (exactly one
    /// per KV head when `geometry` is given), every head valid.
    package func validate(geometry: ModelGeometry? = nil, field: String = "layer") throws(WireError) {
        let layers = geometry.map { "0..<\($0.layers)" } ?? "0...\(UInt32.max)"
        guard layer >= 0, layer <= Int(UInt32.max), geometry.map({ layer < $0.layers }) ?? true else {
            throw WireError(.invalidValue, "\(field).layer must be in \(layers), got \(layer)")
        }
        if let geometry {
            guard heads.count == geometry.kvHeads else {
                throw WireError(
                    .invalidShape,
                    "\(field).heads must hold one entry per KV head (\(geometry.kvHeads)), got \(heads.count)"
                )
            }
        } else if heads.isEmpty {
            throw WireError(.invalidShape, "\(field).heads must hold at least one entry, got none")
        }
        for (index, head) in heads.enumerated() {
            try head.validate(field: "\(field).heads[\(index)]")
        }
    }

    /// The budget of one layer a peer sent.
    package init(
        proto: Tessera_V1_LayerBudget,
        geometry: ModelGeometry? = nil,
        field: String = "layer"
    ) throws(WireError) {
        var heads: [HeadBudget] = []
        heads.reserveCapacity(proto.heads.count)
        for (index, head) in proto.heads.enumerated() {
            heads.append(try HeadBudget(proto: head, field: "\(field).heads[\(index)]"))
        }
        self.init(layer: Int(proto.layer), heads: heads)
        try self.validate(geometry: geometry, field: field)
    }

    /// The budget of one layer as a message, after `validate(geometry:field:)`.
    package func proto(field: String = "layer") throws(WireError) -> Tessera_V1_LayerBudget {
        try self.validate(field: field)
        var message = Tessera_V1_LayerBudget()
        message.layer = UInt32(self.layer)
        message.heads = []
        message.heads.reserveCapacity(self.heads.count)
        for (index, head) in self.heads.enumerated() {
            message.heads.append(try head.proto(field: "\(field).heads[\(index)]"))
        }
        return message
    }
}

extension Array where Element == LayerBudget {
    /// The layer budgets of an `AssignBudget`, in message order; the message's `sequence_id` and
    /// `epoch` are the caller's to check.
    ///
    /// - Parameter geometry: when given, also checks every layer index and head count against it.
    /// - Throws: `.invalidValue`/`.invalidShape` as `LayerBudget.validate(geometry:field:)`;
    ///   `.badRequest` when a layer appears twice.
    package init(
        proto: Tessera_V1_AssignBudget,
        geometry: ModelGeometry? = nil,
        field: String = "assign_budget"
    ) throws(WireError) {
        var layers: [LayerBudget] = []
        layers.reserveCapacity(proto.layers.count)
        for (index, layer) in proto.layers.enumerated() {
            layers.append(try LayerBudget(proto: layer, geometry: geometry, field: "\(field).layers[\(index)]"))
        }
        try Self.checkDistinctLayers(layers, field: field)
        self = layers
    }

    /// The budgets as the `AssignBudget` for `sequenceID` under shard-map `epoch`.
    ///
    /// - Throws: as `init(proto:geometry:field:)`.
    package func proto(
        sequenceID: UInt64,
        epoch: UInt64,
        field: String = "assign_budget"
    ) throws(WireError)
        -> Tessera_V1_AssignBudget
    {
        try Self.checkDistinctLayers(self, field: field)
        var message = Tessera_V1_AssignBudget()
        message.sequenceID = sequenceID
        message.epoch = epoch
        message.layers = []
        message.layers.reserveCapacity(self.count)
        for (index, layer) in self.enumerated() {
            message.layers.append(try layer.proto(field: "\(field).layers[\(index)]"))
        }
        return message
    }

    private static func checkDistinctLayers(_ layers: [LayerBudget], field: String) throws(WireError) {
        var seen: [Int: Int] = [:]
        for (index, budget) in layers.enumerated() {
            if let first = seen.updateValue(index, forKey: budget.layer) {
                throw WireError(
                    .badRequest,
                    "\(field).layers[\(index)].layer \(budget.layer) repeats layers[\(first)]; each layer at most once"
                )
            }
        }
    }
}

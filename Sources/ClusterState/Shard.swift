/// A shard's id: its index in the shard map (shard `i` holds the `i`-th layer range).
public struct ShardID: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public var rawValue: UInt32

    public init(_ rawValue: UInt32) {
        self.rawValue = rawValue
    }

    public init(integerLiteral value: UInt32) {
        self.rawValue = value
    }

    public static func < (lhs: ShardID, rhs: ShardID) -> Bool {
        lhs.rawValue < rhs.rawValue
    }

    public var description: String { "shard \(rawValue)" }

    var index: Int { Int(rawValue) }
}

/// A worker's part in a shard.
public enum ShardRole: String, Sendable, Hashable, CaseIterable {
    /// Accepts writes and forwards them to the replicas before acknowledging.
    case primary
    /// Holds a copy; can be promoted.
    case replica
}

/// A contiguous range of the model's layers and the workers that hold it.
public struct Shard: Sendable, Hashable, CustomStringConvertible {
    public var id: ShardID
    /// The layers, a non-empty sub-range of `0..<layerCount`.
    public var layers: Range<Int>
    /// The primary first, then the replicas; distinct. Empty when no live worker holds the shard.
    public var owners: [NodeID]
    /// Increases whenever the shard's layers or owners change; data-plane requests carry it so that
    /// an owner that missed a change (a paused old primary) is fenced off.
    public var epoch: UInt64

    public init(id: ShardID, layers: Range<Int>, owners: [NodeID], epoch: UInt64) {
        self.id = id
        self.layers = layers
        self.owners = owners
        self.epoch = epoch
    }

    /// The worker that accepts writes, or nil when the shard has no owner.
    public var primary: NodeID? { owners.first }

    /// The workers holding copies.
    public var replicas: [NodeID] { Array(owners.dropFirst()) }

    /// What `nodeID` does for this shard, or nil when it holds nothing of it.
    public func role(of nodeID: NodeID) -> ShardRole? {
        guard let index = owners.firstIndex(of: nodeID) else { return nil }
        return index == 0 ? .primary : .replica
    }

    public var description: String {
        "\(id) layers \(layers.lowerBound)..<\(layers.upperBound) epoch \(epoch) owners \(owners.map(\.rawValue))"
    }
}

/// Every shard, ordered by first layer, under one map epoch: what the coordinator hands to clients.
public struct Placement: Sendable, Hashable {
    /// The shard map's epoch.
    public var epoch: UInt64
    /// The model's layer count; the shards cover `0..<layerCount` exactly once.
    public var layerCount: Int
    /// The replication the map aims for (a shard may have fewer owners when workers are missing).
    public var replication: Int
    public var shards: [Shard]

    public init(epoch: UInt64, layerCount: Int, replication: Int, shards: [Shard]) {
        self.epoch = epoch
        self.layerCount = layerCount
        self.replication = replication
        self.shards = shards
    }
}

/// One shard before and after an update. `before == nil`: the shard was created; `after == nil`:
/// it was removed (by `reshard`).
public struct ShardChange: Sendable, Hashable, CustomStringConvertible {
    public var before: Shard?
    public var after: Shard?

    public init(before: Shard?, after: Shard?) {
        precondition(before != nil || after != nil, "a shard change needs a before or an after")
        self.before = before
        self.after = after
    }

    public var shardID: ShardID {
        // One of the two is set (checked in init).
        (after ?? before)!.id
    }

    /// Owners after the change that did not hold the shard before: they need the shard's data
    /// copied from the primary (re-replication).
    public var addedOwners: [NodeID] {
        let old = before?.owners ?? []
        return (after?.owners ?? []).filter { !old.contains($0) }
    }

    /// Owners before the change that no longer hold the shard: they may drop it.
    public var removedOwners: [NodeID] {
        let new = after?.owners ?? []
        return (before?.owners ?? []).filter { !new.contains($0) }
    }

    /// True when the primary is a different worker (or the shard gained or lost its only owner).
    public var primaryChanged: Bool { before?.primary != after?.primary }

    public var description: String {
        "\(shardID): \(before.map { "\($0.owners.map(\.rawValue))@\($0.epoch)" } ?? "new") -> "
            + "\(after.map { "\($0.owners.map(\.rawValue))@\($0.epoch)" } ?? "removed")"
    }
}

/// What an update of the shard map did: the map epoch afterwards and the changed shards, ordered by
/// id. No changes means nothing happened and the epoch did not move.
public struct ShardMapUpdate: Sendable, Hashable {
    public var epoch: UInt64
    public var changes: [ShardChange]

    public init(epoch: UInt64, changes: [ShardChange]) {
        self.epoch = epoch
        self.changes = changes
    }

    public var isEmpty: Bool { changes.isEmpty }
}

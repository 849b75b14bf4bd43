/// How the model's layers are cut into shards and how many workers hold each.
public struct ShardMapSettings: Sendable, Hashable {
    /// Owners per shard (the primary included). A shard has `min(replication, live workers)`.
    public var replication: Int
    /// How many shards to cut the layers into. `nil`: one per live worker when the map is laid out,
    /// at most one per layer.
    public var shardCount: Int?

    public init(replication: Int = 1, shardCount: Int? = nil) {
        self.replication = replication
        self.shardCount = shardCount
    }

    /// Replication 1, one shard per worker.
    public static var defaults: ShardMapSettings { ShardMapSettings() }

    public func validate(layerCount: Int) throws(ClusterStateError) {
        guard replication >= 1, replication <= 16 else {
            throw ClusterStateError(.invalidSetting, "replication must be in 1...16, got \(replication)")
        }
        if let shardCount, !(1...layerCount).contains(shardCount) {
            throw ClusterStateError(
                .invalidSetting,
                "shardCount must be in 1...\(layerCount) (the layer count), got \(shardCount)"
            )
        }
    }
}

/// The shard map: contiguous layer ranges, each with a primary and replicas on distinct workers,
/// and epochs for fencing.
///
/// A sans-I/O value like `Membership`: every update returns a `ShardMapUpdate` listing the shards
/// that changed, which the shell turns into `Promote`/`Replicate`/`AssignShard` messages.
///
/// Layout and ownership are separate on purpose:
/// - The **layout** (how many shards, which layers each) is fixed when the map is first laid out:
///   by `init` with workers, or by the first `rebalance(alive:)` that has any. Only `reshard`
///   changes it, because cutting the layers differently moves every shard's data; a coordinator
///   reshards while the cluster forms (no open sequences), not on failures.
/// - The **owners** follow membership through `rebalance(alive:)`, which is sticky: owners that
///   are still live keep their shards (a surviving replica moves up when the primary is gone),
///   missing owners are filled by the least-loaded workers, and then single slots move from the
///   most to the least loaded (replica slots first) until every worker holds `⌊S·R/N⌋` or
///   `⌈S·R/N⌉` owner slots (S shards, R replication, N live workers). A new owner joins as a
///   replica (it needs the data copied) unless the shard had no owner left.
///
/// A fresh layout cuts `L` layers into `S` ranges whose sizes differ by at most one (the larger
/// ones first) and assigns them round-robin over the workers sorted by node id: shard `i` on
/// workers `i, i+1, …, i+R-1` (mod N), evened out as above when `S` is not a multiple of `N`.
///
/// Epochs: the map epoch increases by one on every update that changes anything. A shard's epoch
/// increases by one whenever its layers or owners change, and never goes back, even for a shard id
/// that `reshard` removed and later recreated.
public struct ShardMap: Sendable, Hashable {
    /// The model's layer count.
    public let layerCount: Int
    public let settings: ShardMapSettings
    /// The map epoch: 0 until the first layout, then +1 per update that changed something.
    public private(set) var epoch: UInt64 = 0
    /// The shards ordered by id (and so by first layer); empty until laid out.
    public private(set) var shards: [Shard] = []
    /// The highest epoch any shard with a given id has had; never shrinks.
    private var highestShardEpochs: [UInt64] = []

    /// - Parameters:
    ///   - layerCount: the model's layers, at least 1.
    ///   - alive: the live workers; when not empty the map is laid out at once (epoch 1).
    ///   - settings: replication and shard count.
    public init(layerCount: Int, alive: [NodeID] = [], settings: ShardMapSettings = .defaults) throws(ClusterStateError)
    {
        guard layerCount >= 1 else {
            throw ClusterStateError(.invalidArgument, "layerCount must be at least 1, got \(layerCount)")
        }
        try settings.validate(layerCount: layerCount)
        self.layerCount = layerCount
        self.settings = settings
        if !alive.isEmpty {
            let workers = Self.normalized(alive)
            _ = apply(
                Self.layout(
                    layerCount: layerCount,
                    shardCount: resolvedShardCount(workers: workers.count),
                    workers: workers,
                    replication: settings.replication
                )
            )
        }
    }

    // MARK: Queries

    /// True once the layers have been cut into shards.
    public var isLaidOut: Bool { !shards.isEmpty }

    /// The whole map as handed to clients.
    public var placement: Placement {
        Placement(epoch: epoch, layerCount: layerCount, replication: settings.replication, shards: shards)
    }

    /// The shard with `id`, if it exists.
    public func shard(_ id: ShardID) -> Shard? {
        shards.indices.contains(id.index) ? shards[id.index] : nil
    }

    /// The shard holding `layer`, or nil when the layer is out of range or the map is not laid out.
    public func shard(forLayer layer: Int) -> Shard? {
        guard !shards.isEmpty, layer >= 0, layer < layerCount else { return nil }
        // Ranges are ascending and contiguous: binary search on the lower bounds.
        var low = 0
        var high = shards.count - 1
        while low < high {
            let mid = (low + high + 1) / 2
            if shards[mid].layers.lowerBound <= layer { low = mid } else { high = mid - 1 }
        }
        return shards[low]
    }

    /// The shards holding `layer`: one in a laid-out map, none when the layer is out of range.
    public func shards(forLayer layer: Int) -> [Shard] {
        shard(forLayer: layer).map { [$0] } ?? []
    }

    /// The shards overlapping `layers`, ordered by first layer.
    public func shards(forLayers layers: Range<Int>) -> [Shard] {
        shards.filter { $0.layers.overlaps(layers) }
    }

    /// The shards `nodeID` holds, as primary or replica, ordered by id.
    public func shards(ownedBy nodeID: NodeID) -> [Shard] {
        shards.filter { $0.owners.contains(nodeID) }
    }

    /// The shards `nodeID` holds in `role`, ordered by id.
    public func shards(ownedBy nodeID: NodeID, as role: ShardRole) -> [Shard] {
        shards.filter { $0.role(of: nodeID) == role }
    }

    /// Shards without any owner: their layers cannot be served.
    public var unownedShards: [Shard] { shards.filter(\.owners.isEmpty) }

    /// Shards with fewer owners than `settings.replication`.
    public var underReplicatedShards: [Shard] { shards.filter { $0.owners.count < settings.replication } }

    // MARK: Updates

    /// Brings the owners in line with the live workers (see the type's documentation). Lays the
    /// map out when it is not yet and `alive` is not empty. With no live worker at all, every shard
    /// loses its owners (the layout is kept).
    public mutating func rebalance(alive: [NodeID]) -> ShardMapUpdate {
        let workers = Self.normalized(alive)
        guard isLaidOut else {
            guard !workers.isEmpty else { return ShardMapUpdate(epoch: epoch, changes: []) }
            return apply(
                Self.layout(
                    layerCount: layerCount,
                    shardCount: resolvedShardCount(workers: workers.count),
                    workers: workers,
                    replication: settings.replication
                )
            )
        }
        let owners = Self.balancedOwners(
            current: shards.map(\.owners),
            workers: workers,
            replication: settings.replication
        )
        return apply(zip(shards, owners).map { (layers: $0.layers, owners: $1) })
    }

    /// Cuts the layers anew into `shardCount` shards (default: `settings.shardCount`, else one per
    /// live worker) and assigns them from scratch. Every shard whose layers or owners differ gets a
    /// new epoch; shards beyond the new count are removed. Moves data: meant for cluster formation.
    public mutating func reshard(alive: [NodeID], shardCount: Int? = nil) throws(ClusterStateError) -> ShardMapUpdate {
        let workers = Self.normalized(alive)
        guard
            let count = shardCount ?? settings.shardCount
                ?? (workers.isEmpty ? nil : resolvedShardCount(workers: workers.count))
        else {
            throw ClusterStateError(
                .invalidArgument,
                "cannot choose a shard count without live workers; pass shardCount"
            )
        }
        guard (1...layerCount).contains(count) else {
            throw ClusterStateError(
                .invalidArgument,
                "shardCount must be in 1...\(layerCount) (the layer count), got \(count)"
            )
        }
        return apply(
            Self.layout(
                layerCount: layerCount,
                shardCount: count,
                workers: workers,
                replication: settings.replication
            )
        )
    }

    /// Fails a shard over to a replica after its primary died: the replica (by default the first)
    /// becomes primary, the old primary is dropped from the owners, and the shard's epoch goes up by
    /// one. Refused when the shard is unknown, has no replica, or `replica` is not one of its
    /// replicas. A later `rebalance(alive:)` restores the replication.
    public mutating func promote(shard id: ShardID, to replica: NodeID? = nil) -> PromotionOutcome {
        guard let current = shard(id) else { return .refused(.unknownShard(id)) }
        guard current.owners.count >= 2 else { return .refused(.noReplica(id)) }
        let target = replica ?? current.owners[1]
        guard let position = current.owners.firstIndex(of: target), position > 0 else {
            return .refused(.notAReplica(shard: id, nodeID: target))
        }
        var owners = current.owners
        owners.remove(at: position)
        owners[0] = target
        var proposed = shards.map { (layers: $0.layers, owners: $0.owners) }
        proposed[id.index].owners = owners
        return .promoted(apply(proposed))
    }

    // MARK: Internals

    private func resolvedShardCount(workers: Int) -> Int {
        settings.shardCount ?? min(layerCount, max(1, workers))
    }

    /// Installs a proposal (layers and owners per shard id), bumping the epochs of changed shards
    /// and of the map.
    private mutating func apply(_ proposed: [(layers: Range<Int>, owners: [NodeID])]) -> ShardMapUpdate {
        var changes: [ShardChange] = []
        var next: [Shard] = []
        next.reserveCapacity(proposed.count)
        for (index, proposal) in proposed.enumerated() {
            let old = shards.indices.contains(index) ? shards[index] : nil
            if let old, old.layers == proposal.layers, old.owners == proposal.owners {
                next.append(old)
                continue
            }
            if index == highestShardEpochs.count { highestShardEpochs.append(0) }
            highestShardEpochs[index] += 1
            let shard = Shard(
                id: ShardID(UInt32(index)),
                layers: proposal.layers,
                owners: proposal.owners,
                epoch: highestShardEpochs[index]
            )
            next.append(shard)
            changes.append(ShardChange(before: old, after: shard))
        }
        if shards.count > proposed.count {
            for old in shards[proposed.count...] {
                changes.append(ShardChange(before: old, after: nil))
            }
        }
        guard !changes.isEmpty else { return ShardMapUpdate(epoch: epoch, changes: []) }
        epoch += 1
        shards = next
        return ShardMapUpdate(epoch: epoch, changes: changes)
    }

    /// Distinct node ids in ascending order.
    static func normalized(_ workers: [NodeID]) -> [NodeID] {
        Array(Set(workers)).sorted()
    }

    /// `count` contiguous ranges covering `0..<layerCount`, sizes differing by at most one, the
    /// larger ranges first.
    public static func split(layerCount: Int, shardCount: Int) -> [Range<Int>] {
        precondition(
            layerCount >= 1 && (1...layerCount).contains(shardCount),
            "split needs 1 <= shardCount <= layerCount"
        )
        let base = layerCount / shardCount
        let larger = layerCount % shardCount
        var ranges: [Range<Int>] = []
        ranges.reserveCapacity(shardCount)
        var start = 0
        for index in 0..<shardCount {
            let size = base + (index < larger ? 1 : 0)
            ranges.append(start..<(start + size))
            start += size
        }
        return ranges
    }

    /// A fresh layout: shard `i` on workers `i, i+1, …, i+R-1` (mod N, workers sorted), then
    /// evened out by `balancedOwners` when the shard count does not divide evenly.
    static func layout(
        layerCount: Int,
        shardCount: Int,
        workers: [NodeID],
        replication: Int
    ) -> [(layers: Range<Int>, owners: [NodeID])] {
        let ranges = split(layerCount: layerCount, shardCount: shardCount)
        let n = workers.count
        let r = min(replication, n)
        let roundRobin: [[NodeID]] = ranges.indices.map { shard in (0..<r).map { workers[(shard + $0) % n] } }
        let owners = balancedOwners(current: roundRobin, workers: workers, replication: replication)
        return zip(ranges, owners).map { (layers: $0, owners: $1) }
    }

    /// The sticky assignment (see the type's documentation). `workers` is sorted and distinct.
    ///
    /// 1. Keep the owners that are still live, in order, so a surviving replica moves up to primary.
    /// 2. Fill each missing slot with the least-loaded non-owner; ties go to the worker that follows
    ///    the shard's primary (or, for a shard with no owner, the shard's index) in round-robin
    ///    order. New owners are appended, so they join as replicas unless the shard had no owner.
    /// 3. While two workers' loads differ by two or more, move one slot from a most-loaded to a
    ///    least-loaded worker that does not hold that shard, preferring a replica slot and then the
    ///    highest shard id. Such a slot always exists (the more loaded worker holds at least two
    ///    shards the other does not), and each move lowers the sum of squared loads, so this ends
    ///    with every load within one of every other.
    static func balancedOwners(current: [[NodeID]], workers: [NodeID], replication: Int) -> [[NodeID]] {
        guard !workers.isEmpty else { return current.map { _ in [] } }
        let n = workers.count
        let r = min(replication, n)
        let position = Dictionary(uniqueKeysWithValues: workers.enumerated().map { ($1, $0) })

        // Work on worker indices.
        var owners: [[Int]] = current.map { Array($0.compactMap { position[$0] }.prefix(r)) }
        var load = [Int](repeating: 0, count: n)
        for shardOwners in owners { for worker in shardOwners { load[worker] += 1 } }

        for shard in owners.indices {
            while owners[shard].count < r {
                let anchor = owners[shard].first ?? shard % n
                var best: Int? = nil
                for step in 0..<n {
                    let candidate = (anchor + step) % n
                    guard !owners[shard].contains(candidate) else { continue }
                    if let current = best, load[candidate] >= load[current] { continue }
                    best = candidate
                }
                // r <= n, so a shard with fewer than r owners always has a candidate.
                let chosen = best!
                owners[shard].append(chosen)
                load[chosen] += 1
            }
        }

        while let high = load.max(), let low = load.min(), high - low >= 2 {
            var move: (shard: Int, slot: Int, to: Int)? = nil
            search: for preferReplica in [true, false] {
                for shard in owners.indices.reversed() {
                    for (slot, worker) in owners[shard].enumerated()
                    where load[worker] == high && (slot > 0) == preferReplica {
                        if let to = (0..<n).first(where: { load[$0] == low && !owners[shard].contains($0) }) {
                            move = (shard, slot, to)
                            break search
                        }
                    }
                }
            }
            // Guaranteed to exist (see above); stop rather than spin if that reasoning were wrong.
            guard let move else { break }
            let from = owners[move.shard].remove(at: move.slot)
            owners[move.shard].append(move.to)
            load[from] -= 1
            load[move.to] += 1
        }
        return owners.map { $0.map { workers[$0] } }
    }
}

/// What `promote` did.
public enum PromotionOutcome: Sendable, Hashable {
    /// The update (one changed shard, its epoch one higher).
    case promoted(ShardMapUpdate)
    case refused(PromotionRefusal)
}

/// Why a promotion was refused.
public enum PromotionRefusal: Sendable, Hashable, CustomStringConvertible {
    case unknownShard(ShardID)
    /// The shard has no replica to promote.
    case noReplica(ShardID)
    /// The requested node is not a replica of the shard.
    case notAReplica(shard: ShardID, nodeID: NodeID)

    public var description: String {
        switch self {
        case .unknownShard(let id): "\(id) does not exist"
        case .noReplica(let id): "\(id) has no replica to promote"
        case .notAReplica(let id, let nodeID): "\(nodeID) is not a replica of \(id)"
        }
    }
}

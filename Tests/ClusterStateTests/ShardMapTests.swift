import ClusterState
import Testing

@Suite struct ShardMapTests {
    /// Checks what must hold for any shard map over `alive`: the shards cover every layer exactly
    /// once in contiguous ranges, owners are distinct live workers, and as many as replication
    /// allows. Returns the failures (empty when all hold) so that callers can add their seed.
    static func violations(_ map: ShardMap, alive: [NodeID]) -> [String] {
        var problems: [String] = []
        var next = 0
        for (index, shard) in map.shards.enumerated() {
            if shard.id != ShardID(UInt32(index)) { problems.append("\(shard.id) at index \(index)") }
            if shard.layers.lowerBound != next || shard.layers.isEmpty {
                problems.append("\(shard.id) layers \(shard.layers) do not continue at \(next)")
            }
            next = shard.layers.upperBound
            if Set(shard.owners).count != shard.owners.count { problems.append("\(shard.id) repeats an owner") }
            if !shard.owners.allSatisfy(alive.contains) { problems.append("\(shard.id) has a dead owner") }
            let wanted = min(map.settings.replication, Set(alive).count)
            if shard.owners.count != wanted {
                problems.append("\(shard.id) has \(shard.owners.count) owners, want \(wanted)")
            }
            if shard.epoch == 0 || shard.epoch > map.epoch { problems.append("\(shard.id) epoch \(shard.epoch)") }
        }
        if map.isLaidOut && next != map.layerCount { problems.append("layers end at \(next), not \(map.layerCount)") }
        for layer in 0..<map.layerCount where map.isLaidOut {
            let holders = map.shards(forLayer: layer)
            if holders.count != 1 || !holders[0].layers.contains(layer) { problems.append("layer \(layer) lookup") }
        }
        return problems
    }

    // MARK: Splits

    @Test func splitsAreContiguousAndEven() {
        for layers in 1...80 {
            for count in 1...layers {
                let ranges = ShardMap.split(layerCount: layers, shardCount: count)
                #expect(ranges.count == count)
                #expect(ranges.first?.lowerBound == 0 && ranges.last?.upperBound == layers)
                #expect(zip(ranges, ranges.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound })
                let sizes = ranges.map(\.count)
                #expect(sizes.min()! >= 1 && sizes.max()! - sizes.min()! <= 1, "\(layers) layers, \(count) shards")
                #expect(sizes == sizes.sorted(by: >), "larger ranges first")
            }
        }
    }

    static let combos: [(layers: Int, workers: Int, replication: Int)] = {
        var result: [(Int, Int, Int)] = []
        for layers in [1, 2, 3, 5, 7, 8, 28, 32, 61, 80] {
            for workers in 1...9 {
                for replication in 1...4 { result.append((layers, workers, replication)) }
            }
        }
        return result
    }()

    @Test func freshLayoutsForManyShapes() throws {
        for (layers, count, replication) in Self.combos {
            let nodes = workers(count)
            let label = "\(layers) layers, \(count) workers, R=\(replication)"
            let map = try ShardMap(
                layerCount: layers,
                alive: nodes.reversed(),
                settings: .init(replication: replication)
            )
            #expect(Self.violations(map, alive: nodes).isEmpty, "\(label): \(Self.violations(map, alive: nodes))")
            #expect(map.shards.count == min(layers, count), "\(label)")
            #expect(map.epoch == 1 && map.shards.allSatisfy { $0.epoch == 1 }, "\(label)")
            let sizes = map.shards.map(\.layers.count)
            #expect(sizes.max()! - sizes.min()! <= 1, "\(label)")
            // Round-robin primaries: shard i on worker i mod N.
            #expect(map.shards.allSatisfy { $0.primary == nodes[Int($0.id.rawValue) % count] }, "\(label)")
            // Owner slots and primaries spread within one of each other.
            let loads = map.loads(over: nodes).values
            #expect(loads.max()! - loads.min()! <= 1, "\(label): loads \(map.loads(over: nodes))")
            let primaries = nodes.map { map.shards(ownedBy: $0, as: .primary).count }
            #expect(primaries.max()! - primaries.min()! <= 1, "\(label)")
            // Lookups agree with the shards.
            for node in nodes {
                #expect(map.shards(ownedBy: node) == map.shards.filter { $0.owners.contains(node) }, "\(label)")
            }
            // Rebalancing over the same workers changes nothing.
            var same = map
            #expect(same.rebalance(alive: nodes).isEmpty, "\(label)")
            #expect(same == map, "\(label)")
        }
    }

    @Test func threeWorkersReplicationTwoIsRoundRobin() throws {
        let map = try ShardMap(layerCount: 7, alive: ["c", "a", "b", "a"], settings: .init(replication: 2))
        #expect(map.shards.map(\.layers) == [0..<3, 3..<5, 5..<7])
        #expect(map.shards.map(\.owners) == [["a", "b"], ["b", "c"], ["c", "a"]])
        #expect(map.shards(forLayer: 4).map(\.id) == [1])
        #expect(map.shard(forLayer: 6)?.id == 2)
        #expect(map.shards(forLayer: 7).isEmpty && map.shards(forLayer: -1).isEmpty)
        #expect(map.shards(forLayers: 2..<4).map(\.id) == [0, 1])
        #expect(map.shards(ownedBy: "a").map(\.id) == [0, 2])
        #expect(map.shards(ownedBy: "a", as: .replica).map(\.id) == [2])
        #expect(map.shard(2)?.role(of: "c") == .primary && map.shard(2)?.role(of: "b") == nil)
        let placement = map.placement
        #expect(placement.epoch == 1 && placement.layerCount == 7 && placement.replication == 2)
        #expect(placement.shards == map.shards)
    }

    @Test func settingsAreValidated() throws {
        #expect(throws: ClusterStateError.self) { try ShardMap(layerCount: 0) }
        #expect(throws: ClusterStateError.self) { try ShardMap(layerCount: 4, settings: .init(replication: 0)) }
        #expect(throws: ClusterStateError.self) { try ShardMap(layerCount: 4, settings: .init(shardCount: 5)) }
        #expect(throws: ClusterStateError.self) { try ShardMap(layerCount: 4, settings: .init(shardCount: 0)) }
        var map = try ShardMap(layerCount: 4)
        #expect(throws: ClusterStateError.self) { try map.reshard(alive: []) }
        #expect(throws: ClusterStateError.self) { try map.reshard(alive: ["a"], shardCount: 9) }
    }

    @Test func aFixedShardCountIsHonoured() throws {
        let nodes = workers(3)
        let map = try ShardMap(layerCount: 32, alive: nodes, settings: .init(replication: 2, shardCount: 8))
        #expect(map.shards.count == 8 && map.shards.allSatisfy { $0.layers.count == 4 })
        #expect(Self.violations(map, alive: nodes).isEmpty)
        let loads = map.loads(over: nodes).values
        #expect(loads.max()! - loads.min()! <= 1)
    }

    // MARK: Rebalance and epochs

    @Test func anEmptyMapWaitsForWorkers() throws {
        var map = try ShardMap(layerCount: 6)
        #expect(!map.isLaidOut && map.epoch == 0 && map.placement.shards.isEmpty)
        #expect(map.shards(forLayer: 0).isEmpty)
        #expect(map.rebalance(alive: []).isEmpty && map.epoch == 0)
        let update = map.rebalance(alive: ["b", "a"])
        #expect(update.epoch == 1 && update.changes.count == 2)
        #expect(update.changes.allSatisfy { $0.before == nil })
        #expect(map.shards.map(\.owners) == [["a"], ["b"]])
    }

    @Test func onlyTheChangedShardsGetNewEpochs() throws {
        var map = try ShardMap(layerCount: 8, alive: ["a", "b", "c", "d"])
        #expect(map.shards.map(\.owners) == [["a"], ["b"], ["c"], ["d"]])
        let update = map.rebalance(alive: ["a", "b", "d"])
        #expect(update.epoch == 2 && map.epoch == 2)
        #expect(update.changes.map(\.shardID) == [2])
        let change = try #require(update.changes.first)
        // The orphan goes to the worker after its old slot in round-robin order (all tie at one).
        #expect(change.removedOwners == ["c"] && change.addedOwners == ["d"] && change.primaryChanged)
        #expect(map.shards.map(\.epoch) == [1, 1, 2, 1])
        #expect(map.shards.map(\.layers) == [0..<2, 2..<4, 4..<6, 6..<8], "the layout does not move")
        // Nothing changed: neither epoch moves.
        #expect(map.rebalance(alive: ["d", "b", "a"]).isEmpty)
        #expect(map.epoch == 2)
        // c comes back (a new incarnation, empty): d, now holding two, hands one shard over; only that
        // shard changes.
        let back = map.rebalance(alive: ["a", "b", "c", "d"])
        #expect(back.changes.map(\.shardID) == [3] && back.epoch == 3)
        #expect(map.shards.map(\.owners) == [["a"], ["b"], ["d"], ["c"]])
        #expect(map.shards.map(\.epoch) == [1, 1, 2, 2])
    }

    @Test func aSurvivingReplicaTakesOverAndIsReReplicated() throws {
        let nodes: [NodeID] = ["a", "b", "c", "d"]
        var map = try ShardMap(layerCount: 12, alive: nodes, settings: .init(replication: 2))
        #expect(map.shards.map(\.owners) == [["a", "b"], ["b", "c"], ["c", "d"], ["d", "a"]])
        let update = map.rebalance(alive: ["a", "c", "d"])
        #expect(Self.violations(map, alive: ["a", "c", "d"]).isEmpty)
        // Shard 1 (b primary): c moves up; shard 0 (b replica): a stays primary. Both get a new replica.
        #expect(update.changes.map(\.shardID) == [0, 1])
        #expect(map.shard(0)?.primary == "a" && map.shard(1)?.primary == "c")
        #expect(update.changes.allSatisfy { $0.removedOwners == ["b"] && $0.addedOwners.count == 1 })
        #expect(map.shards.map(\.epoch) == [2, 2, 1, 1])
        let loads = map.loads(over: ["a", "c", "d"]).values
        #expect(loads.max()! - loads.min()! <= 1)
    }

    @Test func replicationShrinksAndRecoversWithTheWorkers() throws {
        var map = try ShardMap(layerCount: 4, alive: ["a", "b", "c"], settings: .init(replication: 3))
        _ = map.rebalance(alive: ["a"])
        #expect(map.shards.allSatisfy { $0.owners == ["a"] })
        #expect(map.underReplicatedShards.count == 3)
        _ = map.rebalance(alive: [])
        #expect(map.unownedShards.count == 3 && map.shards.count == 3)
        #expect(Self.violations(map, alive: []).isEmpty)
        _ = map.rebalance(alive: ["x", "y", "z"])
        #expect(Self.violations(map, alive: ["x", "y", "z"]).isEmpty)
        #expect(map.underReplicatedShards.isEmpty && map.unownedShards.isEmpty)
        #expect(Set(map.shards.compactMap(\.primary)) == ["x", "y", "z"])
    }

    @Test func reshardingKeepsEpochsMonotonic() throws {
        var map = try ShardMap(layerCount: 12, alive: ["a", "b"])
        #expect(map.shards.count == 2)
        // The layout does not follow membership by itself…
        _ = map.rebalance(alive: ["a", "b", "c", "d"])
        #expect(map.shards.count == 2)
        // …a reshard does.
        let grown = try map.reshard(alive: ["a", "b", "c", "d"])
        #expect(map.shards.count == 4 && grown.changes.count == 4)
        #expect(Self.violations(map, alive: ["a", "b", "c", "d"]).isEmpty)
        let epochsBefore = map.shards.map(\.epoch)
        let shrunk = try map.reshard(alive: ["a", "b"], shardCount: 2)
        #expect(shrunk.changes.filter { $0.after == nil }.map(\.shardID) == [2, 3])
        #expect(map.shards.count == 2)
        _ = try map.reshard(alive: ["a", "b", "c", "d"])
        for index in 2..<4 {
            #expect(map.shards[index].epoch > epochsBefore[index], "recreated shard \(index) must not reuse an epoch")
        }
        #expect(map.epoch == 4)
    }

    // MARK: Promote

    @Test func promoteMovesAReplicaUp() throws {
        var map = try ShardMap(layerCount: 6, alive: ["a", "b", "c"], settings: .init(replication: 2))
        let update = try #require(map.promote(shard: 0).update)
        #expect(update.epoch == 2 && update.changes.count == 1)
        let change = try #require(update.changes.first)
        #expect(change.before?.owners == ["a", "b"] && change.after?.owners == ["b"])
        #expect(change.after?.epoch == 2 && change.primaryChanged && change.removedOwners == ["a"])
        #expect(map.shards.map(\.epoch) == [2, 1, 1])
        // Only one owner left: nothing to promote.
        #expect(map.promote(shard: 0) == .refused(.noReplica(0)))
        #expect(map.promote(shard: 9) == .refused(.unknownShard(9)))
        #expect(map.epoch == 2)
        // The next rebalance (a is dead) restores the replication without touching the rest.
        let repair = map.rebalance(alive: ["b", "c"])
        #expect(Self.violations(map, alive: ["b", "c"]).isEmpty)
        #expect(map.shard(0)?.primary == "b" && map.shard(0)?.epoch == 3)
        #expect(repair.changes.map(\.shardID).contains(0))
    }

    @Test func promoteToAChosenReplica() throws {
        var map = try ShardMap(layerCount: 3, alive: ["a", "b", "c"], settings: .init(replication: 3))
        #expect(map.shard(1)?.owners == ["b", "c", "a"])
        #expect(map.promote(shard: 1, to: "b") == .refused(.notAReplica(shard: 1, nodeID: "b")))
        #expect(map.promote(shard: 1, to: "zz") == .refused(.notAReplica(shard: 1, nodeID: "zz")))
        let update = try #require(map.promote(shard: 1, to: "a").update)
        #expect(update.changes.first?.after?.owners == ["a", "c"])
        #expect(map.shard(1)?.epoch == 2 && map.shard(0)?.epoch == 1)
        #expect(PromotionRefusal.noReplica(3).description.contains("no replica"))
    }

    // MARK: Churn

    /// Random deaths, joins and restarts with every invariant checked after each rebalance: coverage,
    /// distinct live owners, balance within one slot, epochs that move exactly for changed shards,
    /// and stickiness (after deaths alone, shards whose owners all survive do not change).
    @Test(arguments: UInt64(1)...16)
    func churn(seed: UInt64) throws {
        var generator = SeededGenerator(seed: seed)
        let layers = [1, 4, 7, 28, 32, 80].randomElement(using: &generator)!
        let replication = Int.random(in: 1...3, using: &generator)
        var nextNode = 0
        func newNode() -> NodeID {
            nextNode += 1
            return NodeID("n\(nextNode < 10 ? "0" : "")\(nextNode)")
        }
        var alive = (0..<Int.random(in: 1...6, using: &generator)).map { _ in newNode() }
        let fixedCount: Int? = Bool.random(using: &generator) ? Int.random(in: 1...layers, using: &generator) : nil
        var map = try ShardMap(
            layerCount: layers,
            alive: alive,
            settings: .init(replication: replication, shardCount: fixedCount)
        )
        let label = "seed \(seed): \(layers) layers R=\(replication) shards=\(fixedCount.map(String.init) ?? "auto")"
        for step in 0..<60 {
            let before = map
            var onlyDeaths = true
            switch Int.random(in: 0..<3, using: &generator) {
            case 0 where alive.count > 1:
                alive.remove(at: Int.random(in: 0..<alive.count, using: &generator))
            case 1 where alive.count > 1:
                // Two die at once.
                alive.shuffle(using: &generator)
                alive.removeLast()
                if alive.count > 1 { alive.removeLast() }
            default:
                onlyDeaths = false
                for _ in 0..<Int.random(in: 1...3, using: &generator) { alive.append(newNode()) }
            }
            let update = map.rebalance(alive: alive)
            let problems = Self.violations(map, alive: alive)
            #expect(problems.isEmpty, "\(label) step \(step): \(problems)")
            let loads = map.loads(over: alive).values
            #expect(loads.max()! - loads.min()! <= 1, "\(label) step \(step): loads \(map.loads(over: alive))")
            #expect(map.epoch == before.epoch + (update.isEmpty ? 0 : 1), "\(label) step \(step)")
            #expect(update.epoch == map.epoch)
            let changed = Set(update.changes.map(\.shardID))
            for (old, new) in zip(before.shards, map.shards) {
                if changed.contains(new.id) {
                    #expect(new.epoch == old.epoch + 1 && new.owners != old.owners, "\(label) step \(step) \(new.id)")
                } else {
                    #expect(new == old, "\(label) step \(step) \(new.id)")
                }
                #expect(new.layers == old.layers, "\(label) step \(step): rebalance moved layers")
                // With one owner per shard nothing constrains the moves, so deaths touch only the
                // dead workers' shards. (With more, evening the load out can take a move elsewhere.)
                if onlyDeaths && replication == 1 && old.owners.allSatisfy(alive.contains) {
                    #expect(new == old, "\(label) step \(step): \(new.id) changed though its owners survived")
                }
                // A surviving owner is never dropped only to be re-added: new owners are fresh.
                if let after = update.changes.first(where: { $0.shardID == new.id }) {
                    #expect(Set(after.addedOwners).isDisjoint(with: old.owners), "\(label) step \(step)")
                }
            }
            var again = map
            #expect(
                again.rebalance(alive: alive.shuffled(using: &generator)).isEmpty,
                "\(label) step \(step): not idempotent"
            )
        }
    }
}

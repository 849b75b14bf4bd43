import ClusterState
import Testing

@Suite struct MembershipTests {
    /// Defaults: heartbeats every 250 ms, suspect after 1 s, dead after 3 s.
    private func cluster(_ nodes: [NodeID] = ["a"], at start: ClusterInstant = .zero) throws -> Membership {
        var membership = try Membership()
        for (index, node) in nodes.enumerated() {
            let outcome = membership.join(
                nodeID: node,
                incarnation: 1,
                address: address(7000 + index),
                memoryCapacityBytes: 1 << 30,
                now: start
            )
            #expect(outcome.changes == [MembershipChange(nodeID: node, incarnation: 1, from: nil, to: .alive)])
        }
        return membership
    }

    @Test func settingsAreValidated() throws {
        #expect(FailureDetectorSettings.defaults.heartbeatInterval == .milliseconds(250))
        #expect(FailureDetectorSettings.defaults.suspectAfter == .seconds(1))
        #expect(FailureDetectorSettings.defaults.deadAfter == .seconds(3))
        try FailureDetectorSettings.defaults.validate()
        let bad = [
            FailureDetectorSettings(heartbeatInterval: .zero),
            FailureDetectorSettings(heartbeatInterval: .seconds(1), suspectAfter: .seconds(1)),
            FailureDetectorSettings(suspectAfter: .seconds(3), deadAfter: .seconds(3)),
        ]
        for settings in bad {
            #expect(throws: ClusterStateError.self) { try Membership(settings: settings) }
            do {
                try settings.validate()
            } catch {
                #expect(error.code == .invalidSetting)
            }
        }
    }

    @Test func joinRecordsTheMember() throws {
        let membership = try cluster(["b", "a"], at: at(ms: 5))
        let a = try #require(membership.member("a"))
        #expect(a.incarnation == 1 && a.state == .alive && a.address == address(7001))
        #expect(a.memoryCapacityBytes == 1 << 30)
        #expect(a.joinedAt == at(ms: 5) && a.lastHeartbeat == at(ms: 5))
        #expect(membership.members.map(\.nodeID) == ["a", "b"])
        #expect(membership.aliveNodeIDs == ["a", "b"])
        #expect(membership.member("zz") == nil)
    }

    @Test func aliveBecomesSuspectThenDead() throws {
        var membership = try cluster()
        #expect(membership.tick(now: at(ms: 999)).isEmpty)
        #expect(membership.nextDeadline == at(ms: 1000))
        #expect(membership.tick(now: at(ms: 1000)) == [.init(nodeID: "a", incarnation: 1, from: .alive, to: .suspect)])
        #expect(membership.member("a")?.state == .suspect)
        #expect(membership.member("a")?.stateChangedAt == at(ms: 1000))
        #expect(membership.liveNodeIDs == ["a"] && membership.aliveNodeIDs.isEmpty)
        // Repeated ticks report nothing new.
        #expect(membership.tick(now: at(ms: 2000)).isEmpty)
        #expect(membership.nextDeadline == at(ms: 3000))
        #expect(membership.tick(now: at(ms: 2999)).isEmpty)
        #expect(membership.tick(now: at(ms: 3000)) == [.init(nodeID: "a", incarnation: 1, from: .suspect, to: .dead)])
        #expect(membership.member("a")?.state == .dead)
        #expect(membership.liveNodeIDs.isEmpty)
        #expect(membership.nextDeadline == nil)
        // Dead is final: no further transitions, heartbeats and re-registration refused.
        #expect(membership.tick(now: at(ms: 60_000)).isEmpty)
        #expect(membership.heartbeat(nodeID: "a", incarnation: 1, now: at(ms: 60_001)) == .declaredDead)
        #expect(membership.member("a")?.state == .dead)
        let rejoin = membership.join(
            nodeID: "a",
            incarnation: 1,
            address: address(7000),
            memoryCapacityBytes: 0,
            now: at(ms: 60_002)
        )
        #expect(rejoin == .refused(.declaredDead(incarnation: 1)))
        #expect(membership.count(.dead) == 1)
    }

    @Test func aLateTickGoesStraightToDead() throws {
        var membership = try cluster()
        #expect(membership.tick(now: at(ms: 3500)) == [.init(nodeID: "a", incarnation: 1, from: .alive, to: .dead)])
    }

    @Test func heartbeatsKeepAMemberAlive() throws {
        var membership = try cluster()
        // Heartbeats every 250 ms with up to 700 ms of extra delay never reach the 1 s threshold.
        var now: UInt64 = 0
        var generator = SeededGenerator(seed: 7)
        for _ in 0..<200 {
            now += 250 + UInt64.random(in: 0...700, using: &generator)
            #expect(membership.tick(now: at(ms: now)).isEmpty, "seed 7, t=\(now) ms")
            #expect(membership.heartbeat(nodeID: "a", incarnation: 1, now: at(ms: now)) == .refreshed)
        }
        #expect(membership.member("a")?.lastHeartbeat == at(ms: now))
    }

    @Test func aSuspectRecoversByHeartbeat() throws {
        var membership = try cluster(["a", "b"])
        #expect(membership.heartbeat(nodeID: "b", incarnation: 1, now: at(ms: 900)) == .refreshed)
        #expect(membership.tick(now: at(ms: 1200)) == [.init(nodeID: "a", incarnation: 1, from: .alive, to: .suspect)])
        #expect(membership.tick(now: at(ms: 1850)).isEmpty)
        let outcome = membership.heartbeat(nodeID: "a", incarnation: 1, now: at(ms: 2500))
        #expect(outcome == .recovered(.init(nodeID: "a", incarnation: 1, from: .suspect, to: .alive)))
        #expect(outcome.isAccepted)
        #expect(membership.member("a")?.state == .alive)
        // The silence restarts from the heartbeat: a is suspect again 1 s later, not dead at 3 s;
        // b, silent since 900 ms, goes its own way.
        #expect(membership.tick(now: at(ms: 2700)) == [.init(nodeID: "b", incarnation: 1, from: .alive, to: .suspect)])
        #expect(membership.tick(now: at(ms: 3500)) == [.init(nodeID: "a", incarnation: 1, from: .alive, to: .suspect)])
        #expect(membership.tick(now: at(ms: 3900)) == [.init(nodeID: "b", incarnation: 1, from: .suspect, to: .dead)])
        #expect(membership.member("a")?.state == .suspect)
        #expect(membership.lastPause == nil)
    }

    /// A detector that did not run (its process stopped or starved) has not seen silence: after a
    /// 5 s gap between ticks nobody is declared dead, and a member that really stopped is declared
    /// dead on the usual schedule counted without the gap.
    @Test func aPauseOfTheDetectorIsNotSilence() throws {
        var membership = try cluster(["a", "b"])
        var now: UInt64 = 0
        while now < 1000 {
            now += 125
            #expect(membership.tick(now: at(ms: now)).isEmpty, "t=\(now) ms")
            if now % 250 == 0 {
                _ = membership.heartbeat(nodeID: "a", incarnation: 1, now: at(ms: now))
                if now <= 500 { _ = membership.heartbeat(nodeID: "b", incarnation: 1, now: at(ms: now)) }
            }
        }
        #expect(membership.lastPause == nil)
        // No tick from 1 s to 6 s: b, silent 500 ms before the pause, counts 750 ms afterwards.
        #expect(membership.tick(now: at(ms: 6000)).isEmpty)
        #expect(membership.lastPause == .milliseconds(4750))
        #expect(membership.member("a")?.lastHeartbeat == at(ms: 5750))
        #expect(membership.member("b")?.lastHeartbeat == at(ms: 5250))
        var changes: [UInt64: [MembershipChange]] = [:]
        now = 6000
        while now < 9000 {
            now += 125
            let tick = membership.tick(now: at(ms: now))
            if !tick.isEmpty { changes[now] = tick }
            if now % 250 == 0 { _ = membership.heartbeat(nodeID: "a", incarnation: 1, now: at(ms: now)) }
        }
        #expect(membership.lastPause == nil)
        #expect(
            changes == [
                6250: [.init(nodeID: "b", incarnation: 1, from: .alive, to: .suspect)],
                8250: [.init(nodeID: "b", incarnation: 1, from: .suspect, to: .dead)],
            ]
        )
        #expect(membership.member("a")?.state == .alive)
    }

    @Test func aSuspectRecoversByReRegistering() throws {
        var membership = try cluster()
        _ = membership.tick(now: at(ms: 1500))
        let outcome = membership.join(
            nodeID: "a",
            incarnation: 1,
            address: address(7100),
            memoryCapacityBytes: 5,
            now: at(ms: 1600)
        )
        #expect(outcome.changes == [.init(nodeID: "a", incarnation: 1, from: .suspect, to: .alive)])
        let member = try #require(outcome.member)
        #expect(member.state == .alive && member.address == address(7100) && member.memoryCapacityBytes == 5)
        #expect(member.joinedAt == .zero && member.lastHeartbeat == at(ms: 1600))
        // Re-registering while alive changes nothing but the details.
        let again = membership.join(
            nodeID: "a",
            incarnation: 1,
            address: address(7100),
            memoryCapacityBytes: 5,
            now: at(ms: 1700)
        )
        #expect(again.member != nil && again.changes.isEmpty)
    }

    @Test func aHigherIncarnationReplacesTheMember() throws {
        var membership = try cluster(["a", "b"])
        let restart = membership.join(
            nodeID: "a",
            incarnation: 2,
            address: address(7200),
            memoryCapacityBytes: 9,
            now: at(ms: 400)
        )
        #expect(
            restart.changes == [
                .init(nodeID: "a", incarnation: 1, from: .alive, to: .dead),
                .init(nodeID: "a", incarnation: 2, from: nil, to: .alive),
            ]
        )
        let member = try #require(membership.member("a"))
        #expect(member.incarnation == 2 && member.state == .alive && member.address == address(7200))
        #expect(member.joinedAt == at(ms: 400))
        // The old incarnation is now refused everywhere.
        #expect(membership.heartbeat(nodeID: "a", incarnation: 1, now: at(ms: 500)) == .staleIncarnation(known: 2))
        #expect(
            membership.join(
                nodeID: "a",
                incarnation: 1,
                address: address(7000),
                memoryCapacityBytes: 0,
                now: at(ms: 500)
            )
            .refusal == .staleIncarnation(offered: 1, known: 2)
        )
        #expect(membership.heartbeat(nodeID: "a", incarnation: 2, now: at(ms: 500)) == .refreshed)
        #expect(membership.members.count == 2)
    }

    @Test func aDeadMemberComesBackWithAHigherIncarnation() throws {
        var membership = try cluster()
        _ = membership.tick(now: at(ms: 3000))
        let restart = membership.join(
            nodeID: "a",
            incarnation: 7,
            address: address(7000),
            memoryCapacityBytes: 0,
            now: at(ms: 4000)
        )
        // The old incarnation was already reported dead: only the join is new.
        #expect(restart.changes == [.init(nodeID: "a", incarnation: 7, from: nil, to: .alive)])
        #expect(membership.member("a")?.state == .alive)
        #expect(membership.tick(now: at(ms: 4999)).isEmpty)
    }

    @Test func staleAndUnknownHeartbeatsAreRefused() throws {
        var membership = try cluster()
        _ = membership.join(nodeID: "a", incarnation: 3, address: address(7000), memoryCapacityBytes: 0, now: .zero)
        #expect(membership.heartbeat(nodeID: "nobody", incarnation: 1, now: at(ms: 1)) == .unknownMember)
        #expect(membership.heartbeat(nodeID: "a", incarnation: 2, now: at(ms: 1)) == .staleIncarnation(known: 3))
        #expect(membership.heartbeat(nodeID: "a", incarnation: 4, now: at(ms: 1)) == .unregisteredIncarnation(known: 3))
        #expect(!HeartbeatOutcome.unknownMember.isAccepted)
        // A refused heartbeat does not refresh the member.
        #expect(membership.member("a")?.lastHeartbeat == .zero)
    }

    @Test(arguments: [
        MemberAddress(host: "", port: 7000), MemberAddress(host: "h", port: 0), MemberAddress(host: "h", port: 65536),
        MemberAddress(host: "h", port: -1),
    ])
    func invalidAddressesAreRefused(bad: MemberAddress) throws {
        var membership = try Membership()
        let outcome = membership.join(nodeID: "a", incarnation: 1, address: bad, memoryCapacityBytes: 0, now: .zero)
        #expect(outcome == .refused(.invalidAddress(bad)))
        #expect(membership.members.isEmpty)
    }

    @Test func declareDeadOnlyHitsTheNamedIncarnation() throws {
        var membership = try cluster(["a", "b"])
        #expect(membership.declareDead(nodeID: "a", incarnation: 2, now: at(ms: 1)) == nil)
        #expect(membership.declareDead(nodeID: "zz", incarnation: 1, now: at(ms: 1)) == nil)
        #expect(
            membership.declareDead(nodeID: "a", incarnation: 1, now: at(ms: 1))
                == .init(nodeID: "a", incarnation: 1, from: .alive, to: .dead)
        )
        #expect(membership.declareDead(nodeID: "a", incarnation: 1, now: at(ms: 2)) == nil)
        #expect(membership.aliveNodeIDs == ["b"])
        #expect(membership.members(in: [.dead]).map(\.nodeID) == ["a"])
    }

    @Test func refusalsExplainThemselves() {
        #expect(JoinRefusal.staleIncarnation(offered: 1, known: 2).description.contains("older"))
        #expect(JoinRefusal.declaredDead(incarnation: 3).description.contains("higher incarnation"))
        #expect(JoinRefusal.invalidAddress(MemberAddress(host: "h", port: 0)).description.contains("1...65535"))
        #expect(MemberAddress(host: "::1", port: 80).description == "[::1]:80")
    }

    /// A random schedule of heartbeats, restarts and ticks against a reference model of the rules.
    @Test(arguments: UInt64(1)...12)
    func matchesAReferenceModel(seed: UInt64) throws {
        var generator = SeededGenerator(seed: seed)
        var membership = try Membership()
        let nodes: [NodeID] = ["a", "b", "c", "d"]
        struct Model {
            var incarnation: UInt64
            var last: UInt64
            var state: MemberState
        }
        var model: [NodeID: Model] = [:]
        var now: UInt64 = 0
        var lastTick: UInt64?
        for step in 0..<400 {
            now += UInt64.random(in: 0...400, using: &generator)
            let node = nodes.randomElement(using: &generator)!
            switch UInt64.random(in: 0..<10, using: &generator) {
            case 0:
                // (Re)start with a higher incarnation.
                let incarnation = (model[node]?.incarnation ?? 0) + UInt64.random(in: 1...2, using: &generator)
                let outcome = membership.join(
                    nodeID: node,
                    incarnation: incarnation,
                    address: address(7000),
                    memoryCapacityBytes: 0,
                    now: at(ms: now)
                )
                #expect(outcome.member?.incarnation == incarnation, "seed \(seed) step \(step)")
                model[node] = Model(incarnation: incarnation, last: now, state: .alive)
            case 1...6:
                let incarnation = model[node]?.incarnation ?? 1
                let outcome = membership.heartbeat(nodeID: node, incarnation: incarnation, now: at(ms: now))
                switch model[node]?.state {
                case nil: #expect(outcome == .unknownMember, "seed \(seed) step \(step)")
                case .dead: #expect(outcome == .declaredDead, "seed \(seed) step \(step)")
                case .alive, .suspect:
                    #expect(outcome.isAccepted, "seed \(seed) step \(step)")
                    model[node]!.last = now
                    model[node]!.state = .alive
                }
            default:
                let changes = membership.tick(now: at(ms: now))
                // A gap over 1 s since the previous tick is a pause; all but 250 ms of it is forgiven.
                if let lastTick, now - lastTick > 1000 {
                    for id in model.keys where model[id]!.state != .dead {
                        model[id]!.last = min(model[id]!.last + (now - lastTick - 250), now)
                    }
                }
                lastTick = now
                var expected: [MembershipChange] = []
                for id in model.keys.sorted() where model[id]!.state != .dead {
                    let silence = now - model[id]!.last
                    let next: MemberState = silence >= 3000 ? .dead : silence >= 1000 ? .suspect : model[id]!.state
                    if next != model[id]!.state {
                        expected.append(
                            .init(nodeID: id, incarnation: model[id]!.incarnation, from: model[id]!.state, to: next)
                        )
                        model[id]!.state = next
                    }
                }
                #expect(changes == expected, "seed \(seed) step \(step) t=\(now) ms")
            }
            for (id, entry) in model {
                #expect(membership.member(id)?.state == entry.state, "seed \(seed) step \(step) \(id)")
                #expect(membership.member(id)?.incarnation == entry.incarnation, "seed \(seed) step \(step) \(id)")
            }
        }
    }
}

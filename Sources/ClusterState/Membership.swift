/// The coordinator's view of the workers: who joined, under which incarnation, where they listen,
/// and whether they are alive, suspect or dead.
///
/// A sans-I/O state machine in the style of swift-cluster-membership's `SWIM.Instance`: every
/// method takes the current time and returns what changed; the shell (the coordinator service) feeds
/// it registrations and heartbeats from the network, calls `tick(now:)` about once per
/// `heartbeatInterval`, and acts on the changes (fail over shards of dead members, re-replicate).
///
/// Rules:
/// - One entry per node id. A join with a higher incarnation replaces the entry (a restarted
///   worker is a new member); the old incarnation is reported dead if it was not already.
/// - A lower incarnation is refused everywhere (a zombie of an old process).
/// - Silence transitions happen only in `tick(now:)`: alive -> suspect after `suspectAfter`,
///   alive or suspect -> dead after `deadAfter`. A heartbeat or re-registration of a suspect
///   makes it alive again.
/// - Only silence the detector was running to see counts. Ticks come every fraction of a heartbeat
///   interval; a gap longer than `suspectAfter` since the previous tick means the shell itself was
///   stopped or starved (a paused coordinator, an overloaded host), and the heartbeats it missed may
///   be waiting in its sockets. That gap, less one heartbeat interval, is added to every member's
///   last heartbeat (`lastPause` reports it), as Cassandra's gossiper ignores a local pause instead
///   of marking every peer down.
/// - Dead is final for an incarnation: its heartbeats and re-registrations are refused, and dead
///   entries are kept (as tombstones) so that they stay refused.
public struct Membership: Sendable, Hashable {
    public let settings: FailureDetectorSettings
    private var table: [NodeID: Member] = [:]
    private var lastTick: ClusterInstant?
    /// The pause the latest `tick(now:)` found and forgave, if it found one.
    public private(set) var lastPause: Duration?

    public init(settings: FailureDetectorSettings = .defaults) throws(ClusterStateError) {
        try settings.validate()
        self.settings = settings
    }

    // MARK: Queries

    /// Every member, dead ones included, ordered by node id.
    public var members: [Member] {
        table.values.sorted { $0.nodeID < $1.nodeID }
    }

    /// The current incarnation of `nodeID`, whatever its state.
    public func member(_ nodeID: NodeID) -> Member? {
        table[nodeID]
    }

    /// Members in one of `states`, ordered by node id.
    public func members(in states: Set<MemberState>) -> [Member] {
        members.filter { states.contains($0.state) }
    }

    /// Node ids of the alive members, ordered.
    public var aliveNodeIDs: [NodeID] {
        members(in: [.alive]).map(\.nodeID)
    }

    /// Node ids of the members not declared dead (alive or suspect), ordered. This is what new
    /// sequences are placed over: a suspect may come back, and moving its shards away and back would
    /// copy data twice.
    public var liveNodeIDs: [NodeID] {
        members(in: [.alive, .suspect]).map(\.nodeID)
    }

    /// The number of members in `state`.
    public func count(_ state: MemberState) -> Int {
        table.values.reduce(0) { $0 + ($1.state == state ? 1 : 0) }
    }

    /// The earliest instant at which `tick(now:)` can change something, or nil when every member
    /// is dead (or there are none).
    public var nextDeadline: ClusterInstant? {
        table.values.compactMap { member -> ClusterInstant? in
            switch member.state {
            case .alive: member.lastHeartbeat + settings.suspectAfter
            case .suspect: member.lastHeartbeat + settings.deadAfter
            case .dead: nil
            }
        }.min()
    }

    // MARK: Events

    /// A worker registers (on first connection, after a reconnect, or after a restart).
    ///
    /// - A new node id joins alive.
    /// - The same incarnation re-registers (a reconnect): address and capacity are updated, the
    ///   member is refreshed, and a suspect becomes alive. Refused when that incarnation is dead.
    /// - A higher incarnation replaces the entry: the old incarnation is reported dead (unless it
    ///   already was) and the new one joins alive.
    /// - A lower incarnation, or an address that is not valid, is refused.
    public mutating func join(
        nodeID: NodeID,
        incarnation: UInt64,
        address: MemberAddress,
        memoryCapacityBytes: UInt64,
        now: ClusterInstant
    ) -> JoinOutcome {
        guard address.isValid else { return .refused(.invalidAddress(address)) }
        let fresh = Member(
            nodeID: nodeID,
            incarnation: incarnation,
            address: address,
            memoryCapacityBytes: memoryCapacityBytes,
            now: now
        )
        guard var existing = table[nodeID] else {
            table[nodeID] = fresh
            return .accepted(fresh, changes: [.init(nodeID: nodeID, incarnation: incarnation, from: nil, to: .alive)])
        }
        if incarnation < existing.incarnation {
            return .refused(.staleIncarnation(offered: incarnation, known: existing.incarnation))
        }
        if incarnation == existing.incarnation {
            guard existing.state != .dead else { return .refused(.declaredDead(incarnation: incarnation)) }
            existing.address = address
            existing.memoryCapacityBytes = memoryCapacityBytes
            existing.lastHeartbeat = max(existing.lastHeartbeat, now)
            var changes: [MembershipChange] = []
            if existing.state == .suspect {
                changes.append(transition(&existing, to: .alive, now: now))
            }
            table[nodeID] = existing
            return .accepted(existing, changes: changes)
        }
        var changes: [MembershipChange] = []
        if existing.state != .dead {
            changes.append(transition(&existing, to: .dead, now: now))
        }
        changes.append(.init(nodeID: nodeID, incarnation: incarnation, from: nil, to: .alive))
        table[nodeID] = fresh
        return .accepted(fresh, changes: changes)
    }

    /// A worker's heartbeat. Refreshes an alive member and brings a suspect back; anything else is
    /// refused with what the worker (or the shell) should do about it.
    public mutating func heartbeat(nodeID: NodeID, incarnation: UInt64, now: ClusterInstant) -> HeartbeatOutcome {
        guard var member = table[nodeID] else { return .unknownMember }
        if incarnation < member.incarnation { return .staleIncarnation(known: member.incarnation) }
        if incarnation > member.incarnation { return .unregisteredIncarnation(known: member.incarnation) }
        member.lastHeartbeat = max(member.lastHeartbeat, now)
        switch member.state {
        case .dead:
            return .declaredDead
        case .alive:
            table[nodeID] = member
            return .refreshed
        case .suspect:
            let change = transition(&member, to: .alive, now: now)
            table[nodeID] = member
            return .recovered(change)
        }
    }

    /// Applies the failure detector at `now`: alive members silent for `suspectAfter` become
    /// suspect, members silent for `deadAfter` become dead (an alive member silent that long goes
    /// straight to dead in one change). Changes are ordered by node id. A pause of the caller since
    /// the previous tick is forgiven first (see the rules above).
    public mutating func tick(now: ClusterInstant) -> [MembershipChange] {
        lastPause = nil
        if let lastTick, case let gap = now.duration(since: lastTick), gap > settings.suspectAfter {
            let pause = gap - settings.heartbeatInterval
            lastPause = pause
            for nodeID in table.keys where table[nodeID]!.state != .dead {
                table[nodeID]!.lastHeartbeat = min(table[nodeID]!.lastHeartbeat + pause, now)
            }
        }
        lastTick = now
        var changes: [MembershipChange] = []
        for nodeID in table.keys.sorted() {
            guard var member = table[nodeID], member.state != .dead else { continue }
            let silence = now.duration(since: member.lastHeartbeat)
            let next: MemberState
            if silence >= settings.deadAfter {
                next = .dead
            } else if silence >= settings.suspectAfter {
                next = .suspect
            } else {
                continue
            }
            guard next != member.state else { continue }
            changes.append(transition(&member, to: next, now: now))
            table[nodeID] = member
        }
        return changes
    }

    /// Declares one incarnation dead without waiting for the detector (the worker said goodbye, or
    /// the shell knows the process is gone). Returns nil, and changes nothing, when `nodeID` is
    /// unknown, runs another incarnation, or is already dead.
    public mutating func declareDead(nodeID: NodeID, incarnation: UInt64, now: ClusterInstant) -> MembershipChange? {
        guard var member = table[nodeID], member.incarnation == incarnation, member.state != .dead else {
            return nil
        }
        let change = transition(&member, to: .dead, now: now)
        table[nodeID] = member
        return change
    }

    private func transition(_ member: inout Member, to state: MemberState, now: ClusterInstant) -> MembershipChange {
        let change = MembershipChange(
            nodeID: member.nodeID,
            incarnation: member.incarnation,
            from: member.state,
            to: state
        )
        member.state = state
        member.stateChangedAt = now
        return change
    }
}

/// What a join did.
public enum JoinOutcome: Sendable, Hashable {
    /// The member as it now stands, and the transitions the join caused (empty for the
    /// re-registration of an alive member). The shell acknowledges the registration.
    case accepted(Member, changes: [MembershipChange])
    /// Nothing changed; the shell answers with an error and may close the connection.
    case refused(JoinRefusal)

    /// The transitions (empty when refused).
    public var changes: [MembershipChange] {
        if case .accepted(_, let changes) = self { return changes }
        return []
    }
}

/// Why a join was refused.
public enum JoinRefusal: Sendable, Hashable, CustomStringConvertible {
    /// A newer incarnation of the node is known: this is an old process.
    case staleIncarnation(offered: UInt64, known: UInt64)
    /// This incarnation was declared dead; the node must restart with a higher incarnation.
    case declaredDead(incarnation: UInt64)
    /// The host is empty or the port is outside 1...65535.
    case invalidAddress(MemberAddress)

    public var description: String {
        switch self {
        case .staleIncarnation(let offered, let known):
            "incarnation \(offered) is older than the known incarnation \(known)"
        case .declaredDead(let incarnation):
            "incarnation \(incarnation) was declared dead; restart with a higher incarnation"
        case .invalidAddress(let address):
            "address '\(address)' is not valid: need a non-empty host and a port in 1...65535"
        }
    }
}

/// What a heartbeat did, and what the shell should tell the worker.
public enum HeartbeatOutcome: Sendable, Hashable {
    /// An alive member was refreshed.
    case refreshed
    /// A suspect member is alive again.
    case recovered(MembershipChange)
    /// The node id is unknown (for example after a coordinator restart): the worker must register.
    case unknownMember
    /// The heartbeat names an older incarnation than the member's: an old process; refuse it.
    case staleIncarnation(known: UInt64)
    /// The heartbeat names a newer incarnation that has not registered yet: the worker must register.
    case unregisteredIncarnation(known: UInt64)
    /// This incarnation was declared dead: the worker must restart with a higher incarnation.
    case declaredDead

    /// True for `refreshed` and `recovered`.
    public var isAccepted: Bool {
        switch self {
        case .refreshed, .recovered: true
        case .unknownMember, .staleIncarnation, .unregisteredIncarnation, .declaredDead: false
        }
    }
}

/// How the coordinator sees one incarnation of a worker. `alive` and `suspect` may alternate;
/// `dead` is final for the incarnation: only a higher incarnation of the same node id comes back.
public enum MemberState: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case alive
    case suspect
    case dead

    public var description: String { rawValue }
}

/// One member of the cluster (one incarnation of a worker).
public struct Member: Sendable, Hashable, CustomStringConvertible {
    public internal(set) var nodeID: NodeID
    /// Changes on every restart of the node; higher replaces lower.
    public internal(set) var incarnation: UInt64
    public internal(set) var address: MemberAddress
    /// The most K/V bytes the worker may hold; 0 means no explicit cap.
    public internal(set) var memoryCapacityBytes: UInt64
    public internal(set) var state: MemberState
    /// When this incarnation joined.
    public internal(set) var joinedAt: ClusterInstant
    /// The latest join or heartbeat of this incarnation.
    public internal(set) var lastHeartbeat: ClusterInstant
    /// When `state` last changed (the join, for a member that never changed).
    public internal(set) var stateChangedAt: ClusterInstant

    init(
        nodeID: NodeID,
        incarnation: UInt64,
        address: MemberAddress,
        memoryCapacityBytes: UInt64,
        now: ClusterInstant
    ) {
        self.nodeID = nodeID
        self.incarnation = incarnation
        self.address = address
        self.memoryCapacityBytes = memoryCapacityBytes
        self.state = .alive
        self.joinedAt = now
        self.lastHeartbeat = now
        self.stateChangedAt = now
    }

    public var description: String { "\(nodeID)#\(incarnation)@\(address) \(state)" }
}

/// One state transition of one incarnation. `from == nil` means the incarnation just joined.
public struct MembershipChange: Sendable, Hashable, CustomStringConvertible {
    public var nodeID: NodeID
    public var incarnation: UInt64
    public var from: MemberState?
    public var to: MemberState

    public init(nodeID: NodeID, incarnation: UInt64, from: MemberState?, to: MemberState) {
        self.nodeID = nodeID
        self.incarnation = incarnation
        self.from = from
        self.to = to
    }

    public var description: String {
        "\(nodeID)#\(incarnation): \(from.map(\.rawValue) ?? "joined") -> \(to)"
    }
}

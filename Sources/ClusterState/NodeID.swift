/// A node's id: a string the node chooses (see `common.proto`). Together with an incarnation, which
/// changes on every restart, it names one process lifetime. Ordered by its string so that every
/// computation that walks members does so in the same order on every run.
public struct NodeID: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByStringLiteral {
    public var rawValue: String

    public init(_ rawValue: String) {
        self.rawValue = rawValue
    }

    public init(stringLiteral value: String) {
        self.rawValue = value
    }

    public static func < (lhs: NodeID, rhs: NodeID) -> Bool {
        lhs.rawValue < rhs.rawValue
    }

    public var description: String { rawValue }
}

/// Where a member's data-plane listener is reached.
public struct MemberAddress: Hashable, Sendable, CustomStringConvertible {
    /// A host name or an IP literal, without brackets.
    public var host: String
    /// A TCP port in 1...65535.
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// True when the host is non-empty and the port is in 1...65535 (0 is "pick one", never a
    /// reachable listener).
    public var isValid: Bool { !host.isEmpty && (1...65535).contains(port) }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

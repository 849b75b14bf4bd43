/// The one error type of the cluster state machines: a stable code and a message that names what was
/// wrong and what is allowed. Only settings and arguments that come from configuration throw; the
/// outcome of an ordinary event (a refused join, a stale heartbeat, a refused admission) is a value.
public struct ClusterStateError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable, CaseIterable {
        /// A settings value is out of range or inconsistent with another.
        case invalidSetting
        /// An argument is out of range (a layer count, a shard count).
        case invalidArgument
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }
}

/// The one error type of the compression core: a stable code and a message that names what was
/// wrong and what is allowed.
public struct KVCacheError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable, Codable {
        case invalidGeometry
        case invalidShape
        case invalidValue
        case invalidBudget
        case invalidSetting
        case unknownName
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }
}

import FoundationEssentials

/// The secret a caller of the admin endpoint's mutating routes presents as `Authorization: Bearer TOKEN`.
public struct AdminToken: Sendable {
    private let secret: [UInt8]

    /// The shortest token accepted, in bytes: shorter ones are guessable.
    public static let minimumBytes = 16

    public init(_ secret: String) throws(ClusterAdminError) {
        guard secret.utf8.count >= Self.minimumBytes, !secret.contains(where: \.isWhitespace) else {
            throw ClusterAdminError(
                code: .invalidValue,
                message: "an admin token needs at least \(Self.minimumBytes) bytes and no white space"
            )
        }
        self.secret = Array(secret.utf8)
    }

    /// The token in `path` (surrounding white space and a final newline ignored).
    public init(file path: String) throws(ClusterAdminError) {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ClusterAdminError(code: .fileNotReadable, message: "cannot read the admin token file \(path)")
        }
        let text = String(decoding: data, as: UTF8.self)
        try self.init(String(text.drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed()))
    }

    /// A new random token (32 hexadecimal digits from the system's generator).
    public static func random() -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<4).map { _ in String(generator.next() as UInt64, radix: 16).leftPadded(to: 16) }.joined()
    }

    /// Whether an `Authorization` header carries this token. The comparison takes the same time
    /// wherever the first difference is, so timing does not reveal how much of a guess was right.
    func accepts(authorization: String?) -> Bool {
        guard let authorization, authorization.hasPrefix("Bearer ") else { return false }
        let presented = Array(authorization.utf8.dropFirst("Bearer ".utf8.count))
        guard presented.count == secret.count else { return false }
        var difference: UInt8 = 0
        for (a, b) in zip(presented, secret) { difference |= a ^ b }
        return difference == 0
    }
}

extension String {
    fileprivate func leftPadded(to length: Int) -> String {
        String(repeating: "0", count: max(0, length - count)) + self
    }
}

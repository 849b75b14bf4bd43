/// A coding key for any string or index; used to list the keys a mapping really has.
struct AnyCodingKey: CodingKey {
    var stringValue: String
    var intValue: Int?

    init(stringValue: String) {
        self.stringValue = stringValue
        self.intValue = nil
    }

    init(intValue: Int) {
        self.stringValue = "\(intValue)"
        self.intValue = intValue
    }
}

/// Formats a coding path as the dotted field path used in messages: `coordinator.memory.floorRatio`,
/// `items[2]`.
func fieldPath(_ codingPath: [any CodingKey]) -> String {
    var path = ""
    for key in codingPath {
        if let index = key.intValue {
            path += "[\(index)]"
        } else {
            if !path.isEmpty { path += "." }
            path += key.stringValue
        }
    }
    return path
}

extension Decoder {
    /// Throws ``ClusterAdminError/Code/unknownKey`` naming the first key of this mapping that `Keys` lacks.
    func rejectUnknownKeys<Keys: CodingKey & CaseIterable>(_ keys: Keys.Type, section: String) throws {
        let container = try self.container(keyedBy: AnyCodingKey.self)
        for key in container.allKeys where Keys(stringValue: key.stringValue) == nil {
            let path = fieldPath(self.codingPath + [key])
            let allowed = Keys.allCases.map(\.stringValue).joined(separator: ", ")
            throw ClusterAdminError(
                code: .unknownKey,
                message: "unknown key \(path); \(section) allows: \(allowed)",
                fieldPath: path
            )
        }
    }

    /// Decodes a string that must be one of `Choice`'s raw values, naming the allowed values otherwise.
    func decodeChoice<Choice: RawRepresentable & CaseIterable>(_ type: Choice.Type) throws -> Choice
    where Choice.RawValue == String {
        let raw = try self.singleValueContainer().decode(String.self)
        if let choice = Choice(rawValue: raw) { return choice }
        let path = fieldPath(self.codingPath)
        let allowed = Choice.allCases.map(\.rawValue).joined(separator: ", ")
        throw ClusterAdminError(
            code: .invalidValue,
            message: "\(path) must be one of \(allowed), got \"\(raw)\"",
            fieldPath: path
        )
    }
}

extension KeyedDecodingContainer {
    /// The value for `key`, or `value` when the key is missing or `null`.
    func decode<Value: Decodable>(_ key: Key, default value: Value) throws -> Value {
        try self.decodeIfPresent(Value.self, forKey: key) ?? value
    }
}

import Yams

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

extension ClusterConfiguration {
    /// Reads, decodes and validates a YAML configuration file.
    ///
    /// - Throws: ``ClusterAdminError``: ``ClusterAdminError/Code/fileNotReadable`` for a missing or unreadable
    ///   file, ``ClusterAdminError/Code/malformedYAML`` for a syntax error, ``ClusterAdminError/Code/unknownKey``
    ///   or ``ClusterAdminError/Code/invalidValue``; `file` is `path`, and `line` is set whenever the offending
    ///   value is in the file.
    public static func load(path: String) throws(ClusterAdminError) -> Self {
        let data: Data
        do {
            data = try Data(contentsOf: URL(filePath: path))
        } catch {
            let reason =
                if let cocoa = error as? CocoaError, cocoa.code == .fileReadNoSuchFile || cocoa.code == .fileNoSuchFile
                {
                    "no such file"
                } else {
                    "\(error)"
                }
            throw ClusterAdminError(
                code: .fileNotReadable,
                message: "cannot read configuration file: \(reason)",
                file: path,
                cause: error
            )
        }
        guard let yaml = String(validating: data, as: UTF8.self) else {
            throw ClusterAdminError(code: .fileNotReadable, message: "configuration file is not UTF-8", file: path)
        }
        return try Self.decode(yaml: yaml, file: path)
    }

    /// Decodes (and by default validates) a configuration from YAML text. An empty document (or one with only
    /// comments) gives ``defaults``.
    ///
    /// - Parameters:
    ///   - yaml: The YAML text.
    ///   - file: The name errors report as their `file`.
    ///   - validate: Whether to run ``validate()``; pass `false` to merge flags first and validate after.
    public static func decode(
        yaml: String,
        file: String? = nil,
        validate: Bool = true
    ) throws(ClusterAdminError)
        -> Self
    {
        let parser: Parser
        let root: Node?
        do {
            // The resolver YAMLDecoder itself uses: only merge keys are special, so `no` stays a string.
            parser = try Parser(yaml: yaml, resolver: Resolver.basic.appending(.merge))
            root = try parser.singleRoot()
        } catch {
            throw Self.syntaxError(error, file: file)
        }

        var configuration = Self.defaults
        if let root, !Self.isEmptyDocument(root) {
            do {
                // The parser owns the anchors the nodes refer to; keep it alive while decoding.
                configuration = try withExtendedLifetime(parser) {
                    try YAMLDecoder().decode(Self.self, from: root)
                }
            } catch {
                throw Self.locate(Self.decodingError(error, root: root), root: root, file: file)
            }
        }
        if validate {
            do {
                try configuration.validate()
            } catch {
                throw Self.locate(error, root: root, file: file)
            }
        }
        return configuration
    }

    /// This configuration as YAML, e.g. to log the effective configuration.
    public func yamlString() throws -> String {
        try YAMLEncoder().encode(self)
    }

    private static func isEmptyDocument(_ node: Node) -> Bool {
        guard case .scalar(let scalar) = node else { return false }
        return scalar.style == .plain && ["", "~", "null", "Null", "NULL"].contains(scalar.string)
    }

    private static func syntaxError(_ error: any Error, file: String?) -> ClusterAdminError {
        var line: Int?
        var problem = "\(error)"
        if let yamlError = error as? YamlError {
            switch yamlError {
            case .scanner(let context, let text, let mark, _),
                .parser(let context, let text, let mark, _),
                .composer(let context, let text, let mark, _):
                line = mark.line
                problem = (context.map { "\($0.text) " } ?? "") + text
            case .reader(let text, _, _, _):
                problem = text
            case .duplicatedKeysInMapping(let duplicates, let context):
                line = context.mark.line
                problem = "duplicate keys \(duplicates.joined(separator: ", ")) \(context.text)"
            default:
                break
            }
        }
        return ClusterAdminError(
            code: .malformedYAML,
            message: "invalid YAML: \(problem)",
            file: file,
            line: line,
            cause: error
        )
    }

    /// Turns whatever the decoder threw into a ``ClusterAdminError`` naming the field and what it must be.
    private static func decodingError(_ error: any Error, root: Node) -> ClusterAdminError {
        if let error = error as? ClusterAdminError { return error }
        guard let decodingError = error as? DecodingError else {
            return ClusterAdminError(code: .invalidValue, message: "invalid configuration: \(error)", cause: error)
        }
        let codingPath: [any CodingKey]
        let expected: String
        switch decodingError {
        case .typeMismatch(let type, let context):
            codingPath = context.codingPath
            expected = Self.describe(expected: type)
        case .valueNotFound(let type, let context):
            codingPath = context.codingPath
            expected = Self.describe(expected: type)
        case .keyNotFound(let key, let context):
            codingPath = context.codingPath + [key]
            expected = "present"
        case .dataCorrupted(let context):
            codingPath = context.codingPath
            expected = "valid (\(context.debugDescription))"
        @unknown default:
            return ClusterAdminError(code: .invalidValue, message: "invalid configuration: \(error)", cause: error)
        }
        let path = fieldPath(codingPath)
        let found = Self.node(at: codingPath.map(\.stringValue), in: root).map { Self.describe(found: $0.value) }
        let subject = path.isEmpty ? "the configuration" : path
        return ClusterAdminError(
            code: .invalidValue,
            message: "\(subject) must be \(expected)" + (found.map { ", got \($0)" } ?? ""),
            fieldPath: path.isEmpty ? nil : path,
            cause: error
        )
    }

    private static func describe(expected type: Any.Type) -> String {
        switch type {
        case is Node.Mapping.Type, is [String: UInt64].Type: "a mapping"
        case is Node.Sequence.Type: "a list"
        case is UInt64.Type, is UInt.Type, is UInt32.Type: "a non-negative integer"
        case is Int.Type, is Int64.Type, is Int32.Type: "an integer"
        case is Double.Type, is Float.Type: "a number"
        case is String.Type, is Node.Scalar.Type: "a single value"
        default: "of type \(type)"
        }
    }

    private static func describe(found node: Node) -> String {
        switch node {
        case .scalar(let scalar): "\"\(scalar.string)\""
        case .mapping: "a mapping"
        case .sequence: "a list"
        case .alias: "an alias"
        }
    }

    /// The key and value nodes at `path` (mapping keys only), or `nil` if the file doesn't have it.
    private static func node(at path: [String], in root: Node) -> (key: Node?, value: Node)? {
        var current: (key: Node?, value: Node) = (nil, root)
        for component in path {
            guard let mapping = current.value.mapping,
                let pair = mapping.first(where: { $0.key.string == component })
            else { return nil }
            current = (pair.key, pair.value)
        }
        return current
    }

    /// Adds `file` and, if the offending field is in the document, its line.
    private static func locate(_ error: ClusterAdminError, root: Node?, file: String?) -> ClusterAdminError {
        var error = error
        error.file = error.file ?? file
        if error.line == nil, let path = error.fieldPath, let root,
            let found = Self.node(at: path.split(separator: ".").map(String.init), in: root)
        {
            error.line = (found.key ?? found.value).mark?.line
        }
        return error
    }
}

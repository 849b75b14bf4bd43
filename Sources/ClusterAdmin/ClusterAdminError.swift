/// The one error type of the `ClusterAdmin` module.
///
/// Follows the service-lifecycle shape: a struct wrapping a private code enum, so codes can be added
/// without breaking the API. Configuration errors carry the dotted path of the offending field
/// (`worker.maxFrameBytes`) and, when the value came from a file, the file and the line.
public struct ClusterAdminError: Error, Sendable, CustomStringConvertible {
    /// What went wrong, coarsely.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Wrapped: Hashable, Sendable {
            case fileNotReadable
            case malformedYAML
            case unknownKey
            case invalidValue
            case bindFailed
            case requestFailed
        }

        private let wrapped: Wrapped

        private init(_ wrapped: Wrapped) {
            self.wrapped = wrapped
        }

        /// The configuration file is missing, unreadable or not UTF-8.
        public static var fileNotReadable: Self { Self(.fileNotReadable) }
        /// The configuration file is not valid YAML.
        public static var malformedYAML: Self { Self(.malformedYAML) }
        /// The configuration names a key that no setting has.
        public static var unknownKey: Self { Self(.unknownKey) }
        /// A setting has the wrong type or a value outside its allowed range.
        public static var invalidValue: Self { Self(.invalidValue) }
        /// The admin server could not bind its listening socket.
        public static var bindFailed: Self { Self(.bindFailed) }
        /// A request to another process's admin endpoint failed or was refused.
        public static var requestFailed: Self { Self(.requestFailed) }

        public var description: String {
            switch self.wrapped {
            case .fileNotReadable: "fileNotReadable"
            case .malformedYAML: "malformedYAML"
            case .unknownKey: "unknownKey"
            case .invalidValue: "invalidValue"
            case .bindFailed: "bindFailed"
            case .requestFailed: "requestFailed"
            }
        }
    }

    /// The kind of failure.
    public var code: Code
    /// A human-readable message, e.g. `worker.maxFrameBytes must be in 1024...1073741824, got 12`.
    public var message: String
    /// The dotted path of the configuration field at fault, e.g. `coordinator.memory.floorRatio`.
    public var fieldPath: String?
    /// The configuration file the error was found in, if any.
    public var file: String?
    /// The 1-based line in ``file`` (or in the YAML text) where the offending value or syntax error is.
    public var line: Int?
    /// The underlying error, if any.
    public var cause: (any Error)?

    public init(
        code: Code,
        message: String,
        fieldPath: String? = nil,
        file: String? = nil,
        line: Int? = nil,
        cause: (any Error)? = nil
    ) {
        self.code = code
        self.message = message
        self.fieldPath = fieldPath
        self.file = file
        self.line = line
        self.cause = cause
    }

    /// `file:line: message`, dropping whichever location parts are unknown.
    public var description: String {
        var prefix = ""
        if let file {
            prefix = file
            if let line { prefix += ":\(line)" }
            prefix += ": "
        } else if let line {
            prefix = "line \(line): "
        }
        return prefix + self.message
    }
}

/// The one error type of the wire layer: a stable code, a message that names what was expected and
/// what arrived, and optionally the underlying error.
///
/// The codes mirror `tessera.v1.ErrorCode` one to one, so a `WireError` can travel to the peer as an
/// `Error` message and come back out unchanged (except for `cause`, which stays local).
public struct WireError: Error, Sendable, CustomStringConvertible {
    /// Why a request failed. A struct over a private enum, so that codes can be added without
    /// breaking exhaustive switches in other modules.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        enum Wrapped: String, Sendable, Hashable, CaseIterable {
            case badRequest = "BAD_REQUEST"
            case invalidShape = "INVALID_SHAPE"
            case invalidValue = "INVALID_VALUE"
            case unknownSequence = "UNKNOWN_SEQUENCE"
            case wrongTenant = "WRONG_TENANT"
            case notPrimary = "NOT_PRIMARY"
            case staleEpoch = "STALE_EPOCH"
            case resourceExhausted = "RESOURCE_EXHAUSTED"
            case unsupportedVersion = "UNSUPPORTED_VERSION"
            case frameTooLarge = "FRAME_TOO_LARGE"
            case malformedFrame = "MALFORMED_FRAME"
            case `internal` = "INTERNAL"
            case unavailable = "UNAVAILABLE"
            case permissionDenied = "PERMISSION_DENIED"
        }

        let wrapped: Wrapped

        init(_ wrapped: Wrapped) { self.wrapped = wrapped }

        /// The request is not valid for reasons not covered by a more specific code.
        public static let badRequest = Code(.badRequest)
        /// A tensor's shape or byte count does not match what is required.
        public static let invalidShape = Code(.invalidShape)
        /// A value is out of range or not finite.
        public static let invalidValue = Code(.invalidValue)
        /// The sequence id is not known to the receiver.
        public static let unknownSequence = Code(.unknownSequence)
        /// The sequence belongs to another tenant.
        public static let wrongTenant = Code(.wrongTenant)
        /// The receiver is not the shard's primary; refresh the placement and retry.
        public static let notPrimary = Code(.notPrimary)
        /// The request's epoch does not match the receiver's; refresh the placement and retry.
        public static let staleEpoch = Code(.staleEpoch)
        /// Admission refused (memory cap, full queue); retry later.
        public static let resourceExhausted = Code(.resourceExhausted)
        /// The peer speaks a protocol version this node does not.
        public static let unsupportedVersion = Code(.unsupportedVersion)
        /// A frame's length prefix exceeded the limit.
        public static let frameTooLarge = Code(.frameTooLarge)
        /// A frame could not be parsed.
        public static let malformedFrame = Code(.malformedFrame)
        /// A bug or an unexpected condition.
        public static let `internal` = Code(.internal)
        /// Temporarily unable to serve; retry later.
        public static let unavailable = Code(.unavailable)
        /// The peer's certificate does not allow the request (its role, node id or tenant).
        public static let permissionDenied = Code(.permissionDenied)

        /// Every code, in the order of `tessera.v1.ErrorCode`.
        public static var allCodes: [Code] { Wrapped.allCases.map(Code.init) }

        /// The proto enum's name without its prefix, e.g. `NOT_PRIMARY`.
        public var description: String { wrapped.rawValue }

        /// Whether the stream can no longer be trusted after this error, so the connection must be
        /// closed (rather than answering the one request with an error).
        public var closesConnection: Bool {
            switch wrapped {
            case .frameTooLarge, .malformedFrame, .unsupportedVersion: true
            default: false
            }
        }
    }

    /// What went wrong, for programs.
    public var code: Code
    /// What went wrong, for people.
    public var message: String
    /// When set, the sender suggests waiting this long before retrying.
    public var retryAfter: Duration?
    /// The underlying error, if any. Never sent to the peer.
    public var cause: (any Error)?

    public init(_ code: Code, _ message: String, retryAfter: Duration? = nil, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.retryAfter = retryAfter
        self.cause = cause
    }

    public var description: String {
        var text = "\(code): \(message)"
        if let retryAfter { text += " (retry after \(retryAfter))" }
        if let cause { text += " (cause: \(cause))" }
        return text
    }
}

// MARK: - Proto conversion

extension WireError.Code {
    /// The proto enum value of this code.
    package var proto: Tessera_V1_ErrorCode {
        switch wrapped {
        case .badRequest: .badRequest
        case .invalidShape: .invalidShape
        case .invalidValue: .invalidValue
        case .unknownSequence: .unknownSequence
        case .wrongTenant: .wrongTenant
        case .notPrimary: .notPrimary
        case .staleEpoch: .staleEpoch
        case .resourceExhausted: .resourceExhausted
        case .unsupportedVersion: .unsupportedVersion
        case .frameTooLarge: .frameTooLarge
        case .malformedFrame: .malformedFrame
        case .internal: .internal
        case .unavailable: .unavailable
        case .permissionDenied: .permissionDenied
        }
    }

    /// The code for a proto enum value; `nil` for `UNSPECIFIED` and for values this build does not
    /// know (sent by a newer peer).
    package init?(proto: Tessera_V1_ErrorCode) {
        switch proto {
        case .unspecified, .UNRECOGNIZED: return nil
        case .badRequest: self = .badRequest
        case .invalidShape: self = .invalidShape
        case .invalidValue: self = .invalidValue
        case .unknownSequence: self = .unknownSequence
        case .wrongTenant: self = .wrongTenant
        case .notPrimary: self = .notPrimary
        case .staleEpoch: self = .staleEpoch
        case .resourceExhausted: self = .resourceExhausted
        case .unsupportedVersion: self = .unsupportedVersion
        case .frameTooLarge: self = .frameTooLarge
        case .malformedFrame: self = .malformedFrame
        case .internal: self = .internal
        case .unavailable: self = .unavailable
        case .permissionDenied: self = .permissionDenied
        }
    }
}

extension WireError {
    /// The longest `retryAfter` that travels on the wire (`uint32` milliseconds).
    static let maxRetryAfterMillis = UInt64(UInt32.max)

    /// The error as it travels to the peer. `cause` is dropped; `retryAfter` is rounded up to whole
    /// milliseconds and clamped to `UInt32.max` milliseconds.
    package var proto: Tessera_V1_Error {
        var error = Tessera_V1_Error()
        error.code = code.proto
        error.message = message
        if let retryAfter, retryAfter > .zero {
            let (seconds, attoseconds) = retryAfter.components
            let attosecondsPerMilli: Int64 = 1_000_000_000_000_000
            let millis = seconds.multipliedReportingOverflow(by: 1000)
            let fraction = (attoseconds + attosecondsPerMilli - 1) / attosecondsPerMilli
            if millis.overflow || millis.partialValue > Int64(Self.maxRetryAfterMillis) - fraction {
                error.retryAfterMillis = UInt32.max
            } else {
                error.retryAfterMillis = UInt32(millis.partialValue + fraction)
            }
        }
        return error
    }

    /// The error a peer sent. An unspecified or unknown code becomes `.internal`, with the raw value
    /// named in the message.
    package init(proto: Tessera_V1_Error) {
        let retryAfter: Duration? =
            proto.retryAfterMillis > 0 ? .milliseconds(Int64(proto.retryAfterMillis)) : nil
        if let code = Code(proto: proto.code) {
            self.init(code, proto.message, retryAfter: retryAfter)
        } else {
            self.init(
                .internal,
                "peer sent error code \(proto.code.rawValue), which this node does not know: \(proto.message)",
                retryAfter: retryAfter
            )
        }
    }
}

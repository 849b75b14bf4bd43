/// The one error type of the workload module: a stable code and a message that names what was
/// wrong and what is allowed.
public struct WorkloadError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable, Codable {
        case unknownPreset
        case invalidSetting
        /// A workload file that cannot be read, is not valid YAML, or breaks a rule.
        case invalidFile
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }
}

/// The kind of multimodal request a trace imitates. `mixed` draws one of the others per sequence.
public enum WorkloadPreset: String, CaseIterable, Sendable, Hashable, Codable {
    /// A system prompt, one image, a question.
    case imageQA = "image-qa"
    /// Four to eight images, each introduced by a little text, then a question.
    case multiImage = "multi-image"
    /// A short instruction, 16–32 pooled frames, a question.
    case video
    /// One page image followed by a long text, then a question.
    case document
    /// Per sequence: image-qa 40%, multi-image 25%, video 15%, document 20%.
    case mixed

    /// The draw weights of `mixed`.
    public static let mixtureWeights: [(preset: WorkloadPreset, weight: Double)] = [
        (.imageQA, 0.4), (.multiImage, 0.25), (.video, 0.15), (.document, 0.2),
    ]

    /// The preset called `name` (its raw value, e.g. "image-qa").
    public static func named(_ name: String) throws(WorkloadError) -> WorkloadPreset {
        guard let preset = WorkloadPreset(rawValue: name) else {
            throw WorkloadError(
                .unknownPreset,
                "unknown workload preset '\(name)'; allowed: \(allCases.map(\.rawValue).joined(separator: ", "))"
            )
        }
        return preset
    }
}

/// What produced a prompt position: text, the n-th image, or the n-th video frame.
public enum Modality: Sendable, Hashable, Codable {
    case text
    case image(Int)
    case videoFrame(Int)

    public var isVisual: Bool {
        if case .text = self { return false }
        return true
    }
}

/// A modality packed into 32 bits, so that every cached row can carry one without an enum's padding:
/// the top two bits are the kind, the rest the image or frame index.
public struct ModalityTag: Sendable, Hashable, Codable {
    public var rawValue: UInt32

    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public init(_ modality: Modality) {
        switch modality {
        case .text: rawValue = 0
        case .image(let n): rawValue = 1 << 30 | UInt32(truncatingIfNeeded: n) & Self.indexMask
        case .videoFrame(let n): rawValue = 2 << 30 | UInt32(truncatingIfNeeded: n) & Self.indexMask
        }
    }

    private static let indexMask: UInt32 = (1 << 30) - 1

    public static let text = ModalityTag(rawValue: 0)

    public var isVisual: Bool { rawValue >> 30 != 0 }

    public var modality: Modality {
        switch rawValue >> 30 {
        case 1: return .image(Int(rawValue & Self.indexMask))
        case 2: return .videoFrame(Int(rawValue & Self.indexMask))
        default: return .text
        }
    }

    /// The coarse bucket used in accounting: "text", "image" or "video".
    public var kindName: String {
        switch rawValue >> 30 {
        case 1: return "image"
        case 2: return "video"
        default: return "text"
        }
    }
}

/// A contiguous run of prompt positions of one modality.
public struct ModalitySpan: Sendable, Hashable, Codable {
    public var modality: Modality
    public var start: Int
    public var count: Int

    public init(_ modality: Modality, start: Int, count: Int) {
        self.modality = modality
        self.start = start
        self.count = count
    }

    public var end: Int { start + count }
}

/// The modality of every prompt position, built from spans that must tile `0..<promptLength`.
public struct PromptLayout: Sendable, Hashable {
    public let spans: [ModalitySpan]
    public let tags: [ModalityTag]

    public init(spans: [ModalitySpan]) throws(KVCacheError) {
        var next = 0
        var tags: [ModalityTag] = []
        for span in spans {
            guard span.start == next, span.count > 0 else {
                throw KVCacheError(
                    .invalidShape,
                    "modality spans must tile the prompt without gaps or overlaps: expected a span "
                        + "starting at \(next), got start \(span.start) count \(span.count)"
                )
            }
            tags.append(contentsOf: repeatElement(ModalityTag(span.modality), count: span.count))
            next = span.end
        }
        guard next > 0 else { throw KVCacheError(.invalidShape, "a prompt needs at least one position") }
        self.spans = spans
        self.tags = tags
    }

    public var promptLength: Int { tags.count }

    public var visualCount: Int { spans.lazy.filter(\.modality.isVisual).map(\.count).reduce(0, +) }

    /// `v` of the papers: the first position after the last visual token (0 if there is none).
    public var postVisionStart: Int { spans.last(where: \.modality.isVisual)?.end ?? 0 }
}

/// Bytes in each accounting bucket (text, image, video). Three counters rather than a dictionary, so
/// that summing over every head of every sequence, as each heartbeat does, allocates nothing.
public struct ModalityBytes: Sendable, Equatable {
    public var text: Int
    public var image: Int
    public var video: Int

    public init(text: Int = 0, image: Int = 0, video: Int = 0) {
        self.text = text
        self.image = image
        self.video = video
    }

    /// `rowBytes` for each tag, in the tag's bucket.
    public init(_ tags: [ModalityTag], rowBytes: Int) {
        var counts = (0, 0, 0)
        for tag in tags {
            switch tag.rawValue >> 30 {
            case 1: counts.1 += 1
            case 2: counts.2 += 1
            default: counts.0 += 1
            }
        }
        self.init(text: counts.0 * rowBytes, image: counts.1 * rowBytes, video: counts.2 * rowBytes)
    }

    public var total: Int { text + image + video }

    /// Every bucket with its name ("text", "image", "video"), zeros included: for gauges, which
    /// should read 0 once a bucket empties.
    public var buckets: [(name: String, bytes: Int)] { [("text", text), ("image", image), ("video", video)] }

    public static func + (lhs: Self, rhs: Self) -> Self {
        Self(text: lhs.text + rhs.text, image: lhs.image + rhs.image, video: lhs.video + rhs.video)
    }

    public static func += (lhs: inout Self, rhs: Self) { lhs = lhs + rhs }

    public static func * (lhs: Self, rhs: Int) -> Self {
        Self(text: lhs.text * rhs, image: lhs.image * rhs, video: lhs.video * rhs)
    }
}

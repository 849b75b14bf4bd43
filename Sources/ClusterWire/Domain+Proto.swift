package import KVCacheCore

// Conversions between the generated `tessera.v1` messages and the KVCacheCore domain types.
//
// Every conversion validates in both directions and throws `WireError`: decoding so that a peer
// cannot hand invalid input to the core, encoding so that a bug on this side is reported here rather
// than by the peer. Messages name the field ("spans[2].kind"), the value that arrived and what is
// allowed. Decoding is `init(proto:…)` on the domain type, encoding `proto(…)` on it, as for
// `WireScalarType` and `WireError.Code`.
//
// This file: shared helpers, `ModelGeometry`, `ModalitySpan`/`PromptLayout` and `ScalarType`.
// Policies are in PolicyCoding.swift, statistics and budgets in Budget+Proto.swift, prefill and
// decode tensors in LayerTensors+Proto.swift.

// MARK: - Helpers

extension WireError {
    /// The wire error for an error of the core, with `field` in front of the core's message.
    ///
    /// `invalidShape` stays `.invalidShape`, `unknownName` becomes `.badRequest`, every other code
    /// (geometry, value, budget, setting) `.invalidValue`. The core error is kept as `cause`.
    package init(_ error: KVCacheError, field: String) {
        let code: Code
        switch error.code {
        case .invalidShape: code = .invalidShape
        case .unknownName: code = .badRequest
        default: code = .invalidValue
        }
        self.init(code, "\(field): \(error.message)", cause: error)
    }
}

/// `value` as a `uint32` field, or `.invalidValue` naming `field`.
func wireUInt32(_ value: Int, field: String) throws(WireError) -> UInt32 {
    guard let converted = UInt32(exactly: value) else {
        throw WireError(.invalidValue, "\(field) must be in 0...\(UInt32.max), got \(value)")
    }
    return converted
}

/// Runs a throwing call of the core and maps its error with `WireError.init(_:field:)`.
func mapCoreError<Result>(
    field: String,
    _ body: () throws(KVCacheError) -> Result
) throws(WireError) -> Result {
    do throws(KVCacheError) {
        return try body()
    } catch {
        throw WireError(error, field: field)
    }
}

// MARK: - ModelGeometry

extension ModelGeometry {
    /// The geometry a peer sent, validated by `ModelGeometry.init` (layers 1...512, kvHeads 1...256,
    /// queryHeads a multiple of kvHeads, headDim 1...1024, tokensPerImage 1...16384).
    ///
    /// - Throws: `.invalidValue` naming the offending field.
    package init(proto: Tessera_V1_ModelGeometry, field: String = "model") throws(WireError) {
        self = try mapCoreError(field: field) { () throws(KVCacheError) in
            try ModelGeometry(
                name: proto.name,
                layers: Int(proto.layers),
                queryHeads: Int(proto.queryHeads),
                kvHeads: Int(proto.kvHeads),
                headDim: Int(proto.headDim),
                tokensPerImage: Int(proto.tokensPerImage)
            )
        }
    }

    /// The geometry as a message, after `validate()` (the fields are `var`s, so a geometry can have
    /// been changed since it was built).
    ///
    /// - Throws: `.invalidValue` naming the offending field.
    package func proto(field: String = "model") throws(WireError) -> Tessera_V1_ModelGeometry {
        try mapCoreError(field: field) { () throws(KVCacheError) in try self.validate() }
        var message = Tessera_V1_ModelGeometry()
        message.name = self.name
        // Validated above: every number is small and positive.
        message.layers = UInt32(self.layers)
        message.queryHeads = UInt32(self.queryHeads)
        message.kvHeads = UInt32(self.kvHeads)
        message.headDim = UInt32(self.headDim)
        message.tokensPerImage = UInt32(self.tokensPerImage)
        return message
    }
}

// MARK: - Modality spans and prompt layout

extension ModalitySpan {
    /// The largest image or video-frame index: `ModalityTag` keeps 30 bits of it.
    package static let maxWireIndex = (1 << 30) - 1

    /// One span a peer sent, checked on its own (kind, index, count); whether the spans tile the
    /// prompt is checked by `PromptLayout(proto:)`.
    ///
    /// - Throws: `.invalidValue` for an `UNSPECIFIED` or unknown kind, a text span with an index
    ///   other than 0, an index above `maxWireIndex`; `.invalidShape` for a count of 0.
    package init(proto: Tessera_V1_ModalitySpan, field: String = "span") throws(WireError) {
        let index = Int(proto.index)
        guard index <= Self.maxWireIndex else {
            throw WireError(.invalidValue, "\(field).index must be in 0...\(Self.maxWireIndex), got \(index)")
        }
        let modality: Modality
        switch proto.kind {
        case .text:
            guard index == 0 else {
                throw WireError(.invalidValue, "\(field).index must be 0 for a TEXT span, got \(index)")
            }
            modality = .text
        case .image: modality = .image(index)
        case .videoFrame: modality = .videoFrame(index)
        case .unspecified, .UNRECOGNIZED:
            throw WireError(
                .invalidValue,
                "\(field).kind must be TEXT (1), IMAGE (2) or VIDEO_FRAME (3), got "
                    + (proto.kind == .unspecified ? "UNSPECIFIED (0)" : "\(proto.kind.rawValue)")
            )
        }
        guard proto.count >= 1 else {
            throw WireError(.invalidShape, "\(field).count must be at least 1, got 0")
        }
        self.init(modality, start: Int(proto.start), count: Int(proto.count))
    }

    /// The span as a message.
    ///
    /// - Throws: `.invalidValue` for a negative or too large index, start or count (a count of 0 is
    ///   `.invalidShape`), or an end past `UInt32.max`.
    package func proto(field: String = "span") throws(WireError) -> Tessera_V1_ModalitySpan {
        var message = Tessera_V1_ModalitySpan()
        let index: Int
        switch self.modality {
        case .text:
            message.kind = .text
            index = 0
        case .image(let n):
            message.kind = .image
            index = n
        case .videoFrame(let n):
            message.kind = .videoFrame
            index = n
        }
        guard (0...Self.maxWireIndex).contains(index) else {
            throw WireError(.invalidValue, "\(field).index must be in 0...\(Self.maxWireIndex), got \(index)")
        }
        guard self.count != 0 else {
            throw WireError(.invalidShape, "\(field).count must be at least 1, got 0")
        }
        message.index = UInt32(index)
        message.start = try wireUInt32(self.start, field: "\(field).start")
        message.count = try wireUInt32(self.count, field: "\(field).count")
        guard UInt64(message.start) + UInt64(message.count) <= UInt64(UInt32.max) else {
            throw WireError(
                .invalidValue,
                "\(field) ends at \(self.start + self.count), past the last position \(UInt32.max)"
            )
        }
        return message
    }
}

extension PromptLayout {
    /// The default bound on a decoded prompt's length. `PromptLayout` keeps 4 bytes per position, so
    /// without a bound one span claiming 4 billion positions would allocate 16 GB.
    package static let defaultMaxWirePromptLength = 1 << 22

    /// The layout a peer sent: every span valid on its own (`ModalitySpan(proto:field:)`), and the
    /// spans tiling `0..<promptLength` in order without gaps or overlaps.
    ///
    /// - Parameter maxPromptLength: the longest prompt accepted.
    /// - Throws: `.invalidShape` for no spans, a gap, an overlap or a prompt longer than
    ///   `maxPromptLength`; the errors of `ModalitySpan(proto:field:)`.
    package init(
        proto: [Tessera_V1_ModalitySpan],
        field: String = "spans",
        maxPromptLength: Int = PromptLayout.defaultMaxWirePromptLength
    ) throws(WireError) {
        let spans = try [ModalitySpan](proto: proto, field: field, maxPromptLength: maxPromptLength)
        self = try mapCoreError(field: field) { () throws(KVCacheError) in try PromptLayout(spans: spans) }
    }

    /// The decode tokens a sequence of this layout declared, checked: prompt and decoded positions
    /// together at most `maxPositions`. Workers reserve room for the declared rows in every head, so
    /// a sequence cannot ask for more than a prompt of that length could hold.
    ///
    /// - Throws: `.invalidValue` naming `field` when the total exceeds `maxPositions`.
    package func checkedDecodeTokens(
        _ tokens: UInt32,
        field: String = "decode_tokens",
        maxPositions: Int = PromptLayout.defaultMaxWirePromptLength
    ) throws(WireError) -> Int {
        let allowed = max(0, maxPositions - promptLength)
        guard Int(tokens) <= allowed else {
            throw WireError(
                .invalidValue,
                "\(field) must be at most \(allowed) (prompt and decoded positions together at most "
                    + "\(maxPositions); the prompt has \(promptLength)), got \(tokens)"
            )
        }
        return Int(tokens)
    }

    /// The layout's spans as messages.
    package func proto(field: String = "spans") throws(WireError) -> [Tessera_V1_ModalitySpan] {
        try self.spans.proto(field: field)
    }
}

extension Array where Element == ModalitySpan {
    /// Spans a peer sent, checked as `PromptLayout(proto:field:maxPromptLength:)` checks them (the
    /// spans must tile a prompt), without building the per-position tags.
    package init(
        proto: [Tessera_V1_ModalitySpan],
        field: String = "spans",
        maxPromptLength: Int = PromptLayout.defaultMaxWirePromptLength
    ) throws(WireError) {
        guard !proto.isEmpty else {
            throw WireError(.invalidShape, "\(field) must hold at least one span, got none")
        }
        var spans: [ModalitySpan] = []
        spans.reserveCapacity(proto.count)
        var next = 0
        for (position, message) in proto.enumerated() {
            let name = "\(field)[\(position)]"
            let span = try ModalitySpan(proto: message, field: name)
            guard span.start == next else {
                throw WireError(
                    .invalidShape,
                    "\(name).start must be \(next) (spans must tile 0..<promptLength in order, without gaps "
                        + "or overlaps), got \(span.start)"
                )
            }
            next = span.end
            guard next <= maxPromptLength else {
                throw WireError(
                    .invalidShape,
                    "\(field): the prompt must be at most \(maxPromptLength) positions long, \(name) ends at \(next)"
                )
            }
            spans.append(span)
        }
        self = spans
    }

    /// The spans as messages; they must tile a prompt, as the receiver checks.
    ///
    /// - Throws: as `ModalitySpan.proto(field:)`, and `.invalidShape` when the spans do not tile
    ///   `0..<promptLength` (or there are none).
    package func proto(field: String = "spans") throws(WireError) -> [Tessera_V1_ModalitySpan] {
        guard !self.isEmpty else {
            throw WireError(.invalidShape, "\(field) must hold at least one span, got none")
        }
        var next = 0
        var messages: [Tessera_V1_ModalitySpan] = []
        messages.reserveCapacity(self.count)
        for (position, span) in self.enumerated() {
            let name = "\(field)[\(position)]"
            guard span.start == next else {
                throw WireError(
                    .invalidShape,
                    "\(name).start must be \(next) (spans must tile 0..<promptLength in order, without gaps "
                        + "or overlaps), got \(span.start)"
                )
            }
            messages.append(try span.proto(field: name))
            next = span.end
        }
        return messages
    }
}

// MARK: - ScalarType

extension ScalarType {
    /// The proto enum value.
    package var proto: Tessera_V1_ScalarType { self.wire.proto }

    /// The wire-layer twin of this type.
    package var wire: WireScalarType {
        switch self {
        case .float32: .float32
        case .float16: .float16
        }
    }

    package init(_ wire: WireScalarType) {
        switch wire {
        case .float32: self = .float32
        case .float16: self = .float16
        }
    }

    /// The storage type a peer named.
    ///
    /// - Throws: `.invalidValue` for `UNSPECIFIED` and values this build does not know.
    package init(proto: Tessera_V1_ScalarType, field: String = "dtype") throws(WireError) {
        guard let wire = WireScalarType(proto: proto) else {
            throw WireError(
                .invalidValue,
                "\(field) must be FLOAT32 (1) or FLOAT16 (2), got "
                    + (proto == .unspecified ? "UNSPECIFIED (0)" : "\(proto.rawValue)")
            )
        }
        self.init(wire)
    }
}

// MARK: - Bytes by modality

extension Array where Element == Tessera_V1_ModalityBytes {
    /// Accounted bytes of the non-empty modality buckets, as on the wire.
    package init(byModality: ModalityBytes) {
        let buckets: [(Tessera_V1_ModalityKind, Int)] = [
            (.image, byModality.image), (.text, byModality.text), (.videoFrame, byModality.video),
        ]
        self = buckets.filter { $0.1 != 0 }.map { kind, bytes in
            var entry = Tessera_V1_ModalityBytes()
            entry.kind = kind
            entry.bytes = UInt64(bytes)
            return entry
        }
    }

    /// The bytes keyed by modality bucket; entries of one bucket are added up (saturating: the
    /// figures come from a peer).
    package var byModality: [String: UInt64] {
        reduce(into: [:]) { result, entry in
            let name =
                switch entry.kind {
                case .image: "image"
                case .videoFrame: "video"
                default: "text"
                }
            result[name] = result[name, default: 0].saturatingSum(entry.bytes)
        }
    }
}

// MARK: - Head row shares

extension HeadRowShares {
    package var proto: Tessera_V1_HeadRowShares {
        var shares = Tessera_V1_HeadRowShares()
        shares.min = min
        shares.max = max
        return shares
    }

    /// Shares a peer reported; nil when it sent none, or figures that are not shares (outside
    /// [0, 1], or a minimum above the maximum): they are only shown, so they are dropped, not refused.
    package init?(proto: Tessera_V1_HeadRowShares, present: Bool) {
        guard present, 0 <= proto.min, proto.min <= proto.max, proto.max <= 1 else { return nil }
        self.init(min: proto.min, max: proto.max)
    }
}

extension UInt64 {
    /// `self + other`, or `UInt64.max` where that overflows: for figures a peer reports.
    package func saturatingSum(_ other: UInt64) -> UInt64 {
        let (sum, overflow) = addingReportingOverflow(other)
        return overflow ? .max : sum
    }

    /// `self × other`, or `UInt64.max` where that overflows.
    package func saturatingProduct(_ other: UInt64) -> UInt64 {
        let (product, overflow) = multipliedReportingOverflow(by: other)
        return overflow ? .max : product
    }
}

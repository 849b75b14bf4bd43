import KVKernels

/// The cached rows of one KV head of one layer: keys and values in storage type `S`, contiguous and
/// row-major, with the original position and modality of every row. Heads of one layer may hold
/// different numbers of rows.
public struct HeadCache<S: KVScalar>: Sendable {
    public let headDim: Int
    public private(set) var keys: [S]
    public private(set) var values: [S]
    public private(set) var positions: [Int32]
    public private(set) var tags: [ModalityTag]

    public init(headDim: Int, capacity: Int = 0) {
        self.headDim = headDim
        keys = []
        values = []
        positions = []
        tags = []
        keys.reserveCapacity(capacity * headDim)
        values.reserveCapacity(capacity * headDim)
        positions.reserveCapacity(capacity)
        tags.reserveCapacity(capacity)
    }

    /// A head from its parts (a copy received from another node), with room for `decodeRows` more
    /// rows (arrays that have it already are kept as they are); nil when their lengths disagree.
    public init?(headDim: Int, keys: [S], values: [S], positions: [Int32], tags: [ModalityTag], decodeRows: Int = 0) {
        guard headDim > 0, keys.count == positions.count * headDim, values.count == keys.count,
            tags.count == positions.count
        else { return nil }
        self.headDim = headDim
        self.keys = keys
        self.values = values
        self.positions = positions
        self.tags = tags
        reserveRoom(decodeRows)
    }

    /// Room for `rows` more rows, reserved only where an array is short: reserving in an array that
    /// is shared copies it even when it fits.
    private mutating func reserveRoom(_ rows: Int) {
        let total = count + max(0, rows)
        if keys.capacity < total * headDim { keys.reserveCapacity(total * headDim) }
        if values.capacity < total * headDim { values.reserveCapacity(total * headDim) }
        if positions.capacity < total { positions.reserveCapacity(total) }
        if tags.capacity < total { tags.reserveCapacity(total) }
    }

    /// A head that keeps every prompt row, taking `keys` and `values` (`tags.count` rows each) as
    /// they are: no copy when they already have room for `decodeRows` more rows and nothing else
    /// holds them once the prefill is gone.
    init(wholePrompt keys: [S], values: [S], tags: [ModalityTag], headDim: Int, decodeRows: Int) {
        let positions = Array(0..<Int32(truncatingIfNeeded: tags.count))
        guard
            let head = HeadCache(
                headDim: headDim,
                keys: keys,
                values: values,
                positions: positions,
                tags: tags,
                decodeRows: decodeRows
            )
        else { preconditionFailure("rows disagree with tags") }
        self = head
    }

    public var count: Int { positions.count }

    /// Bytes of key and value payload.
    public var payloadBytes: Int { 2 * count * headDim * MemoryLayout<S>.size }

    /// Bytes of per-row bookkeeping (position and modality tag).
    public var metadataBytes: Int { count * (MemoryLayout<Int32>.size + MemoryLayout<ModalityTag>.size) }

    /// Appends one row, converting from Float32.
    public mutating func append(
        key: UnsafeBufferPointer<Float>,
        value: UnsafeBufferPointer<Float>,
        position: Int,
        tag: ModalityTag
    ) {
        append(keys: key, values: value, positions: position..<(position + 1), tags: CollectionOfOne(tag))
    }

    /// Appends the rows of consecutive prompt positions, back to back in `keys` and `values`,
    /// converting from Float32: one copy per run, however many rows it has.
    @_specialize(where S == Float, Tags == ArraySlice<ModalityTag>)
    @_specialize(where S == Float16, Tags == ArraySlice<ModalityTag>)
    public mutating func append<Tags: Collection<ModalityTag>>(
        keys rowKeys: UnsafeBufferPointer<Float>,
        values rowValues: UnsafeBufferPointer<Float>,
        positions: Range<Int>,
        tags rowTags: Tags
    ) {
        precondition(
            rowKeys.count == positions.count * headDim && rowValues.count == rowKeys.count
                && rowTags.count == positions.count,
            "rows must be headDim elements per position, with one tag each"
        )
        Self.appendRows(rowKeys, to: &keys)
        Self.appendRows(rowValues, to: &values)
        self.positions.append(contentsOf: positions.lazy.map { Int32(truncatingIfNeeded: $0) })
        tags.append(contentsOf: rowTags)
    }

    @inline(__always)
    private static func appendRows(_ rows: UnsafeBufferPointer<Float>, to storage: inout [S]) {
        if S.self == Float.self {
            // No conversion: copy the rows in, instead of zero-filling them first.
            rows.withMemoryRebound(to: S.self) { storage.append(contentsOf: $0) }
            return
        }
        let start = storage.count
        storage.append(contentsOf: repeatElement(S.zero, count: rows.count))
        storage.withUnsafeMutableBufferPointer {
            S.store(rows.baseAddress!, into: $0.baseAddress! + start, count: rows.count)
        }
    }

    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public mutating func append(key: [Float], value: [Float], position: Int, tag: ModalityTag) {
        key.withUnsafeBufferPointer { k in
            value.withUnsafeBufferPointer { v in append(key: k, value: v, position: position, tag: tag) }
        }
    }

    /// Drops the last row (a decode step that was refused after it was appended).
    public mutating func removeLastRow() {
        guard count > 0 else { return }
        keys.removeLast(headDim)
        values.removeLast(headDim)
        positions.removeLast()
        tags.removeLast()
    }

    /// Attention of `groups` Float32 queries (a GQA group, back to back) over every row, reading each
    /// row once; writes `groups × headDim` outputs and leaves query `g`'s probabilities at
    /// `scratch + g × count` (at least `groups × count` floats).
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public func attend(
        queries: UnsafePointer<Float>,
        groups: Int,
        scratch: UnsafeMutablePointer<Float>,
        output: UnsafeMutablePointer<Float>
    ) {
        keys.withUnsafeBufferPointer { k in
            values.withUnsafeBufferPointer { v in
                Kernels.decodeAttention(
                    queries: queries,
                    groups: groups,
                    keys: k.baseAddress!,
                    values: v.baseAddress!,
                    rows: count,
                    headDim: headDim,
                    scratch: scratch,
                    output: output
                )
            }
        }
    }

    /// The cache with only the rows at `rows` (ascending row indices), in order: how a compressed
    /// cache is tightened to a smaller budget without its prefill.
    public func retaining(rows: [Int]) -> HeadCache {
        var kept = HeadCache(headDim: headDim, capacity: rows.count)
        for row in rows {
            let span = (row * headDim)..<(row * headDim + headDim)
            kept.keys.append(contentsOf: keys[span])
            kept.values.append(contentsOf: values[span])
            kept.positions.append(positions[row])
            kept.tags.append(tags[row])
        }
        return kept
    }

    /// An order-sensitive 64-bit digest of every byte held, for comparing replicas (`kvk_digest`).
    public var digest: UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix<T>(_ array: [T]) {
            hash = array.withUnsafeBytes { kvk_digest(hash, $0.baseAddress, $0.count) }
        }
        mix(positions)
        mix(tags.map(\.rawValue))
        mix(keys)
        mix(values)
        return hash
    }
}

extension HeadCache {
    /// The cache cut to at most `capacity` prompt rows (positions below `promptLength`), keeping those
    /// with the highest `scores` and every decoded row. How a cluster under memory pressure tightens a
    /// sequence that is already compressed: its prefill is gone, so the rows compete on the score
    /// they were kept with. `scores` has one entry per row held at compression; rows appended since
    /// (decoded tokens) have none and are always kept. Returns the kept scored rows' scores.
    public func tightened(promptLength: Int, capacity: Int, scores: [Float]) -> (cache: HeadCache, scores: [Float]) {
        precondition(scores.count <= count, "at most one score per row")
        let prompt = (0..<scores.count).filter { Int(positions[$0]) < promptLength }
        guard prompt.count > capacity else { return (self, scores) }
        let kept =
            Selection.top(max(0, capacity), of: scores, among: prompt)
            + (0..<scores.count).filter { Int(positions[$0]) >= promptLength }
        let scored = kept.sorted()
        return (retaining(rows: scored + Array(scores.count..<count)), scored.map { scores[$0] })
    }
}

/// One layer's prefill tensors in Float32: keys and values of every prompt position for every KV head,
/// and the query rows the policies observe (the last `queryRows` prompt positions of every query head).
///
/// Keys and values are one array per KV head, row-major: `keys[h][j * d + c]` for KV head `h`,
/// position `j`. A head the cache keeps whole then adopts its arrays instead of copying them, and
/// arrays made with room for the decoded rows (`LayerPrefill.headArray`) take those rows in place.
/// Queries are one array: `queries[(h * queryRows + i) * d + c]` for query head `h`, prompt row
/// `m - queryRows + i`.
public struct LayerPrefill: Sendable {
    public let geometry: ModelGeometry
    public let promptLength: Int
    public let queryRows: Int
    public let keys: [[Float]]
    public let values: [[Float]]
    public let queries: [Float]

    /// A prefill from tensors laid out `[kvHeads, promptLength, headDim]` (keys, values) and
    /// `[queryHeads, queryRows, headDim]` (queries), as files and other languages hold them; every
    /// element is checked finite.
    public init(
        geometry: ModelGeometry,
        promptLength m: Int,
        keys: [Float],
        values: [Float],
        queries: [Float],
        queryRows: Int
    ) throws(KVCacheError) {
        let headCount = geometry.kvHeads * m * geometry.headDim
        guard m >= 1, keys.count == headCount, values.count == headCount else {
            throw Self.badKeysAndValues(geometry: geometry, promptLength: m, counts: (keys.count, values.count))
        }
        let perHead = m * geometry.headDim
        func split(_ flat: [Float]) -> [[Float]] {
            (0..<geometry.kvHeads).map { Array(flat[($0 * perHead)..<(($0 + 1) * perHead)]) }
        }
        try self.init(
            geometry: geometry,
            promptLength: m,
            keys: split(keys),
            values: split(values),
            queries: queries,
            queryRows: queryRows,
            checkedFinite: false
        )
    }

    /// A prefill from one key and one value array per KV head (`promptLength × headDim` floats
    /// each). With `checkedFinite`, the elements were all checked finite on their way in (the wire's
    /// checked copy) or are finite by construction (synthesis): the shapes are checked, the
    /// elements not read again.
    package init(
        geometry: ModelGeometry,
        promptLength m: Int,
        keys: [[Float]],
        values: [[Float]],
        queries: [Float],
        queryRows: Int,
        checkedFinite: Bool
    ) throws(KVCacheError) {
        let d = geometry.headDim
        guard m >= 1, keys.count == geometry.kvHeads, values.count == geometry.kvHeads,
            keys.allSatisfy({ $0.count == m * d }), values.allSatisfy({ $0.count == m * d })
        else {
            let counts = (keys.reduce(0) { $0 + $1.count }, values.reduce(0) { $0 + $1.count })
            throw Self.badKeysAndValues(geometry: geometry, promptLength: m, counts: counts)
        }
        guard (0...m).contains(queryRows), queries.count == geometry.queryHeads * queryRows * d else {
            throw KVCacheError(
                .invalidShape,
                "queries must hold queryHeads×queryRows×headDim = \(geometry.queryHeads)×\(queryRows)×\(d) "
                    + "floats with queryRows in 0...\(m), got \(queries.count) floats, queryRows \(queryRows)"
            )
        }
        if !checkedFinite {
            let perHead = m * d
            for (name, heads) in [("keys", keys), ("values", values)] {
                for (h, head) in heads.enumerated() {
                    if let bad = FiniteElements.firstNonFinite(head) {
                        throw KVCacheError(
                            .invalidValue,
                            "\(name)[\(h * perHead + bad)] is \(head[bad]); every element must be finite"
                        )
                    }
                }
            }
            if let bad = FiniteElements.firstNonFinite(queries) {
                throw KVCacheError(.invalidValue, "queries[\(bad)] is \(queries[bad]); every element must be finite")
            }
        }
        self.geometry = geometry
        self.promptLength = m
        self.queryRows = queryRows
        self.keys = keys
        self.values = values
        self.queries = queries
    }

    private static func badKeysAndValues(
        geometry: ModelGeometry,
        promptLength m: Int,
        counts: (keys: Int, values: Int)
    ) -> KVCacheError {
        guard m >= 1 else { return KVCacheError(.invalidShape, "prompt length must be at least 1, got \(m)") }
        let d = geometry.headDim
        return KVCacheError(
            .invalidShape,
            "keys and values must hold kvHeads×promptLength×headDim = \(geometry.kvHeads)×\(m)×\(d) = "
                + "\(geometry.kvHeads * m * d) floats, \(m * d) per head, got \(counts.keys) and \(counts.values)"
        )
    }

    /// An array of `rows × headDim` floats that `fill` writes completely, with room for `spareRows`
    /// more rows: a KV head's prompt rows, with room for the rows its decode steps will append.
    public static func headArray(
        rows: Int,
        spareRows: Int,
        headDim: Int,
        _ fill: (UnsafeMutablePointer<Float>) -> Void
    ) -> [Float] {
        let count = rows * headDim
        return [Float](unsafeUninitializedCapacity: count + max(0, spareRows) * headDim) { buffer, initialized in
            if let base = buffer.baseAddress { fill(base) }
            initialized = count
        }
    }

    /// Per-head arrays back to back, laid out `[kvHeads, promptLength, headDim]` as files and the
    /// wire hold them.
    public static func contiguous(_ heads: [[Float]]) -> [Float] {
        var flat: [Float] = []
        flat.reserveCapacity(heads.reduce(0) { $0 + $1.count })
        for head in heads { flat.append(contentsOf: head) }
        return flat
    }

    /// The same keys and values without query rows (what compression needs once profiled).
    public func withoutQueries() -> LayerPrefill {
        LayerPrefill(geometry: geometry, promptLength: promptLength, keys: keys, values: values)
    }

    private init(geometry: ModelGeometry, promptLength: Int, keys: [[Float]], values: [[Float]]) {
        self.geometry = geometry
        self.promptLength = promptLength
        queryRows = 0
        self.keys = keys
        self.values = values
        queries = []
    }

    /// The first prompt row whose query is present.
    public var firstQueryRow: Int { promptLength - queryRows }

    /// Floats of keys and values together.
    public var keyValueFloats: Int { 2 * geometry.kvHeads * promptLength * geometry.headDim }

    /// Offset of prompt row `row` of query head `head` in `queries`.
    @inline(__always)
    public func queryOffset(head: Int, row: Int) -> Int {
        (head * queryRows + row - firstQueryRow) * geometry.headDim
    }
}

/// One decode step of one layer: the new token's key and value for every KV head and its query for
/// every query head, each `headDim` floats, heads back to back.
public struct DecodeStepInput: Sendable {
    public let keys: [Float]
    public let values: [Float]
    public let queries: [Float]

    public init(geometry: ModelGeometry, keys: [Float], values: [Float], queries: [Float]) throws(KVCacheError) {
        let d = geometry.headDim
        guard keys.count == geometry.kvHeads * d, values.count == keys.count,
            queries.count == geometry.queryHeads * d
        else {
            throw KVCacheError(
                .invalidShape,
                "a decode step needs kvHeads×headDim = \(geometry.kvHeads * d) key and value floats and "
                    + "queryHeads×headDim = \(geometry.queryHeads * d) query floats, got \(keys.count), "
                    + "\(values.count), \(queries.count)"
            )
        }
        for (name, tensor) in [("keys", keys), ("values", values), ("queries", queries)] {
            if let bad = FiniteElements.firstNonFinite(tensor) {
                throw KVCacheError(.invalidValue, "decode \(name)[\(bad)] is \(tensor[bad]); values must be finite")
            }
        }
        self.keys = keys
        self.values = values
        self.queries = queries
    }
}

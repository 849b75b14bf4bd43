/// One layer's prefill tensors in Float32: keys and values of every prompt position for every KV head,
/// and the query rows the policies observe (the last `queryRows` prompt positions of every query head).
///
/// Layouts are row-major and contiguous: `keys[(h * m + j) * d + c]` for KV head `h`, position `j`;
/// `queries[(h * queryRows + i) * d + c]` for query head `h`, prompt row `m - queryRows + i`.
public struct LayerPrefill: Sendable {
    public let geometry: ModelGeometry
    public let promptLength: Int
    public let queryRows: Int
    public let keys: [Float]
    public let values: [Float]
    public let queries: [Float]

    public init(
        geometry: ModelGeometry,
        promptLength m: Int,
        keys: [Float],
        values: [Float],
        queries: [Float],
        queryRows: Int
    ) throws(KVCacheError) {
        try self.init(
            geometry: geometry,
            promptLength: m,
            keys: keys,
            values: values,
            queries: queries,
            queryRows: queryRows,
            checkedFinite: false
        )
    }

    /// The same, for tensors whose elements were all checked finite on their way in (the wire's
    /// checked copy) or are finite by construction (synthesis): the shapes are checked, the elements
    /// not read again.
    package init(
        geometry: ModelGeometry,
        promptLength m: Int,
        keys: [Float],
        values: [Float],
        queries: [Float],
        queryRows: Int,
        checkedFinite: Bool
    ) throws(KVCacheError) {
        let d = geometry.headDim
        let kvCount = geometry.kvHeads * m * d
        guard m >= 1 else { throw KVCacheError(.invalidShape, "prompt length must be at least 1, got \(m)") }
        guard keys.count == kvCount, values.count == kvCount else {
            throw KVCacheError(
                .invalidShape,
                "keys and values must hold kvHeads×promptLength×headDim = \(geometry.kvHeads)×\(m)×\(d) = "
                    + "\(kvCount) floats, got \(keys.count) and \(values.count)"
            )
        }
        guard (0...m).contains(queryRows), queries.count == geometry.queryHeads * queryRows * d else {
            throw KVCacheError(
                .invalidShape,
                "queries must hold queryHeads×queryRows×headDim = \(geometry.queryHeads)×\(queryRows)×\(d) "
                    + "floats with queryRows in 0...\(m), got \(queries.count) floats, queryRows \(queryRows)"
            )
        }
        if !checkedFinite {
            for (name, tensor) in [("keys", keys), ("values", values), ("queries", queries)] {
                if let bad = FiniteElements.firstNonFinite(tensor) {
                    throw KVCacheError(.invalidValue, "\(name)[\(bad)] is \(tensor[bad]); every element must be finite")
                }
            }
        }
        self.geometry = geometry
        self.promptLength = m
        self.queryRows = queryRows
        self.keys = keys
        self.values = values
        self.queries = queries
    }

    /// The same keys and values without query rows (what compression needs once profiled).
    public func withoutQueries() -> LayerPrefill {
        LayerPrefill(geometry: geometry, promptLength: promptLength, keys: keys, values: values)
    }

    private init(geometry: ModelGeometry, promptLength: Int, keys: [Float], values: [Float]) {
        self.geometry = geometry
        self.promptLength = promptLength
        queryRows = 0
        self.keys = keys
        self.values = values
        queries = []
    }

    /// The first prompt row whose query is present.
    public var firstQueryRow: Int { promptLength - queryRows }

    /// Offset of row `position` of KV head `head` in `keys`/`values`.
    @inline(__always)
    public func kvOffset(head: Int, position: Int) -> Int {
        (head * promptLength + position) * geometry.headDim
    }

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

import Crypto

/// Sequence ids scoped to their tenant, so that no tenant can take an id another is about to use.
///
/// The 64-bit id space has three parts:
/// - below 2^62: ids clients choose. Each means something only with its tenant: the coordinator
///   turns it into the cluster's id for that tenant (`cluster(_:tenant:)`), and two tenants'
///   sequence 42 are two sequences;
/// - 2^62 up to 2^63: ids the coordinator chooses for an open with id 0;
/// - 2^63 and above: the cluster's ids of client-chosen ones, the top bit set over the first 63 bits
///   of SHA-256 of the tenant and the id. A pure function, so a retried open, a restarted coordinator
///   and the client library all reach the same id without keeping a table; landing on another
///   tenant's id means finding a second preimage of 63 bits (about 2^63 hashes).
///
/// Placements, workers and every data-plane message carry the cluster's id. Requests to the
/// coordinator (open, placement, close) may carry either; an open must carry a client's id or 0.
public enum SequenceIDs {
    /// Ids below this are chosen by clients and scoped to their tenant.
    public static let clientLimit: UInt64 = 1 << 62
    /// Where the scoped ids start.
    static let scopedBit: UInt64 = 1 << 63

    /// The cluster's id for `id` as `tenant` means it: a client's own id mapped into the tenant's
    /// scope; 0 and the cluster's ids unchanged.
    public static func cluster(_ id: UInt64, tenant: String) -> UInt64 {
        guard id != 0, id < clientLimit else { return id }
        var hash = SHA256()
        // Length-prefixed, so no tenant name and id can spell another pair.
        let name = Array(tenant.utf8)
        hash.update(data: littleEndianBytes(UInt64(name.count)))
        hash.update(data: name)
        hash.update(data: littleEndianBytes(id))
        let digest = Array(hash.finalize())
        let word = digest[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        return word | scopedBit
    }

    /// Whether an open may carry `id`: 0 or an id of the client's choosing.
    public static func isOpenable(_ id: UInt64) -> Bool { id < clientLimit }

    private static func littleEndianBytes(_ value: UInt64) -> [UInt8] {
        (0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
    }
}

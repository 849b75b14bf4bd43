extension Tessera_V1_MembershipView {
    /// Whether this view was made after `other`: by a later coordinator, or later by the same one.
    package func isNewer(than other: Self?) -> Bool {
        guard let other else { return true }
        return (coordinatorIncarnation, version) > (other.coordinatorIncarnation, other.version)
    }

    /// Whether the view counts this incarnation of the worker as live.
    package func counts(_ nodeID: String, incarnation: UInt64) -> Bool {
        members.contains { $0.nodeID == nodeID && $0.incarnation == incarnation }
    }
}

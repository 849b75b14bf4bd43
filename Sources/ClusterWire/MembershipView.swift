extension Tessera_V1_MembershipView {
    /// Whether this view was made after `other`: by a later coordinator, or later by the same one.
    package func isNewer(than other: Self?) -> Bool {
        guard let other else { return true }
        return (coordinatorIncarnation, version) > (other.coordinatorIncarnation, other.version)
    }

    /// Whether the view's coordinator counted this incarnation of the worker as live, or never knew it:
    /// a newer incarnation than the one the view lists started after the view was taken, so that
    /// coordinator cannot have given it up.
    package func counts(_ nodeID: String, incarnation: UInt64) -> Bool {
        members.contains { $0.nodeID == nodeID && $0.incarnation <= incarnation }
    }
}

import ClusterSecurity
import Testing

@Suite struct SequenceIDsTests {
    /// A client's id maps into its tenant's scope exactly as the protocol spells it (values computed
    /// independently with Python's hashlib), so a client in any language can derive it.
    @Test func aClientsIDMapsIntoItsTenantsScope() {
        #expect(SequenceIDs.cluster(5, tenant: "owner") == 11_357_538_024_524_090_489)
        #expect(SequenceIDs.cluster(5, tenant: "mallory") == 11_218_012_884_897_897_600)
        #expect(SequenceIDs.cluster(5, tenant: "owner") != SequenceIDs.cluster(6, tenant: "owner"))
        // The length prefix keeps ("ab", id) and ("a", id with "b" in front) apart.
        #expect(SequenceIDs.cluster(1, tenant: "ab") != SequenceIDs.cluster(1, tenant: "a"))
    }

    /// 0 (the coordinator chooses) and the cluster's own ids are left as they are, so mapping twice
    /// changes nothing; only ids below 2^62 may be opened.
    @Test func theClustersIDsMapToThemselves() {
        let scoped = SequenceIDs.cluster(42, tenant: "t")
        #expect(scoped >= 1 << 63)
        #expect(SequenceIDs.cluster(scoped, tenant: "t") == scoped)
        #expect(SequenceIDs.cluster(scoped, tenant: "other") == scoped)
        #expect(SequenceIDs.cluster(0, tenant: "t") == 0)
        #expect(SequenceIDs.cluster(1 << 62, tenant: "t") == 1 << 62)
        #expect(SequenceIDs.isOpenable(0) && SequenceIDs.isOpenable((1 << 62) - 1))
        #expect(!SequenceIDs.isOpenable(1 << 62) && !SequenceIDs.isOpenable(scoped))
    }
}

import ClusterState
import Testing

@Suite struct ClusterInstantTests {
    @Test func arithmeticAndSaturation() {
        let t = ClusterInstant(nanoseconds: 1_500_000_000)
        #expect(t + .milliseconds(250) == ClusterInstant(nanoseconds: 1_750_000_000))
        #expect(t.advanced(by: .seconds(-1)) == ClusterInstant(nanoseconds: 500_000_000))
        #expect(t.advanced(by: .seconds(-5)) == .zero)
        #expect(ClusterInstant(nanoseconds: .max - 1).advanced(by: .seconds(1)) == ClusterInstant(nanoseconds: .max))
        #expect(t.duration(since: .zero) == .milliseconds(1500))
        #expect(ClusterInstant.zero.duration(since: t) == .zero)
        #expect(ClusterInstant(elapsed: .milliseconds(42)) == at(ms: 42))
        #expect(ClusterInstant(elapsed: .seconds(-3)) == .zero)
        #expect(ClusterInstant(elapsed: .nanoseconds(7)) == ClusterInstant(nanoseconds: 7))
        #expect(at(ms: 1) < at(ms: 2))
        #expect(t.description == "t+1.500000000s")
    }
}

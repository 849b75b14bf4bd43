import Testing

@testable import Worker

/// When a worker gives free heap pages back: only after a surplus over the allowance lasted a second.
struct RetainedPagesTests {
    static let mib: UInt64 = 1 << 20
    /// 100 MiB held: the allowance is 64 MiB + 12.5 MiB.
    static let held = 100 << 20
    static let surplus = 300 * mib

    /// The decision after each observation of resident bytes at a time in milliseconds.
    static func decisions(_ observations: [(resident: UInt64, millis: Int64)], base: UInt64 = 0) -> [Bool] {
        var pages = RetainedPages()
        return observations.map {
            pages.observe(resident: $0.resident, base: base, held: held, at: .milliseconds($0.millis))
        }
    }

    @Test func aSurplusIsReturnedOnlyOnceItLastedTheDecay() {
        let observed = Self.decisions([
            (Self.surplus, 10_000), (Self.surplus, 10_999), (Self.surplus, 11_000),
            // Returned: the next surplus waits a whole decay again.
            (Self.surplus, 12_000), (Self.surplus, 13_000),
        ])
        #expect(observed == [false, false, true, false, true])
    }

    /// Checks closer together than the interval are skipped: a burst of closes checks once.
    @Test func checksAreDueAtMostOncePerInterval() {
        var pages = RetainedPages()
        let due = [0, 40, 99, 100, 150, 250].map { pages.due(at: .milliseconds($0)) }
        #expect(due == [true, false, false, true, false, true])
    }

    @Test func memoryReusedMeanwhileStartsTheWaitOver() {
        let reused = 150 * Self.mib  // 50 MiB over what is held: within the allowance
        let observed = Self.decisions([
            (Self.surplus, 0), (reused, 500), (Self.surplus, 1_000), (Self.surplus, 1_900), (Self.surplus, 2_000),
        ])
        #expect(observed == [false, false, false, false, true])
    }

    @Test func theAllowanceCountsTheBaseAndAnEighthOfTheHeldBytes() {
        let base = 40 * Self.mib
        // base + held + 64 MiB + held/8 = 40 + 100 + 64 + 12.5 MiB: at the limit is no surplus.
        let atLimit = base + UInt64(Self.held) + 64 * Self.mib + UInt64(Self.held / 8)
        let observed = Self.decisions(
            [(atLimit, 0), (atLimit, 5_000), (atLimit + 1, 6_000), (atLimit + 1, 7_000)],
            base: base
        )
        #expect(observed == [false, false, false, true])
    }
}

import ClusterState
import Testing

@Suite struct BudgetLifecycleTests {
    @Test func theFirstBudgetGoesOutOnceWhenTheStatisticsAreComplete() {
        var budget = BudgetLifecycle(retention: 0.2)
        #expect(budget.phase == .gathering && !budget.isCompressed)
        #expect(budget.statisticsComplete() == BudgetLifecycle.Assign(retention: 0.2))
        // Every copy reports the same statistics, and a restarted worker reports them again.
        #expect(budget.statisticsComplete() == nil)
        #expect(budget.phase == .assigning(retention: 0.2, attempt: 1))
        #expect(budget.assignmentFinished(everyCopyApplied: true, now: at(ms: 10)) == .compressed(retention: 0.2))
        #expect(budget.isCompressed && budget.compressedRetention == 0.2)
        #expect(budget.statisticsComplete() == nil, "a compressed sequence is not assigned again")
    }

    /// The defect this replaces: a failed assignment marked the sequence as assigned, and nothing
    /// ever sent its budget again.
    @Test func aFailedAssignmentIsRetriedUntilEveryCopyAppliedIt() {
        var budget = BudgetLifecycle(retention: 0.1)
        _ = budget.statisticsComplete()
        #expect(
            budget.assignmentFinished(everyCopyApplied: false, now: at(ms: 1000))
                == .retrying(retention: 0.1, attempt: 1, due: at(ms: 1250))
        )
        #expect(!budget.isCompressed, "not compressed while a copy lacks the budget")
        #expect(budget.tick(now: at(ms: 1249)) == nil, "not before the backoff")
        #expect(budget.tighten(to: 0.05) == nil, "not tightened while retrying")
        #expect(budget.tick(now: at(ms: 1250)) == BudgetLifecycle.Assign(retention: 0.1))
        #expect(budget.tick(now: at(ms: 5000)) == nil, "one assignment in flight at a time")
        // Fails again: the backoff doubles.
        #expect(
            budget.assignmentFinished(everyCopyApplied: false, now: at(ms: 2000))
                == .retrying(retention: 0.1, attempt: 2, due: at(ms: 2500))
        )
        #expect(budget.tick(now: at(ms: 2500)) == BudgetLifecycle.Assign(retention: 0.1))
        #expect(budget.assignmentFinished(everyCopyApplied: true, now: at(ms: 2600)) == .compressed(retention: 0.1))
    }

    @Test func theBackoffDoublesUpToFiveSeconds() {
        #expect(BudgetLifecycle.backoff(attempt: 1) == .milliseconds(250))
        #expect(BudgetLifecycle.backoff(attempt: 2) == .milliseconds(500))
        #expect(BudgetLifecycle.backoff(attempt: 5) == .seconds(4))
        #expect(BudgetLifecycle.backoff(attempt: 6) == .seconds(5))
        #expect(BudgetLifecycle.backoff(attempt: 1000) == .seconds(5))
        #expect(BudgetLifecycle.backoff(attempt: 0) == .milliseconds(250))
    }

    @Test func aTighteningThatFailsIsRetriedAtTheTighterRetention() {
        var budget = BudgetLifecycle(retention: 0.4)
        _ = budget.statisticsComplete()
        budget.assignmentFinished(everyCopyApplied: true, now: at(ms: 0))
        #expect(budget.tighten(to: 0.4) == nil, "not below what it holds")
        #expect(budget.tighten(to: 0.2) == BudgetLifecycle.Assign(retention: 0.2))
        #expect(budget.tighten(to: 0.1) == nil, "one assignment in flight at a time")
        // Some copies cut to 0.2, others not: it is not compressed at either until all have.
        budget.assignmentFinished(everyCopyApplied: false, now: at(ms: 100))
        #expect(budget.compressedRetention == nil)
        #expect(budget.tick(now: at(ms: 350)) == BudgetLifecycle.Assign(retention: 0.2))
        budget.assignmentFinished(everyCopyApplied: true, now: at(ms: 400))
        #expect(budget.compressedRetention == 0.2)
    }

    @Test func eventsOutOfPhaseChangeNothing() {
        var budget = BudgetLifecycle(retention: 0.3)
        #expect(budget.assignmentFinished(everyCopyApplied: true, now: at(ms: 0)) == .gathering)
        #expect(budget.tick(now: at(ms: 1_000_000)) == nil)
        #expect(budget.tighten(to: 0.1) == nil)
        #expect(budget.phase == .gathering)
    }

    @Test func aRestoredSequenceIsCompressedOnlyIfEveryCopySaysSo() {
        var budget = BudgetLifecycle(restoredCompressed: true, retention: 0.2)
        #expect(budget.compressedRetention == 0.2)
        #expect(budget.statisticsComplete() == nil)
        // Another copy of it registers without a budget: it goes out again once the statistics are in.
        budget.copyUncompressed()
        #expect(budget.phase == .gathering)
        #expect(budget.statisticsComplete() == BudgetLifecycle.Assign(retention: 0.2))
        var fresh = BudgetLifecycle(restoredCompressed: false, retention: 0.2)
        #expect(fresh.phase == .gathering)
        fresh.copyUncompressed()
        #expect(fresh.phase == .gathering)
    }

    /// Random event sequences: whatever the order, it is compressed only right after an assignment
    /// that every copy applied, at most one assignment is in flight, and every failure is retried.
    @Test func randomSchedulesKeepTheInvariants() {
        for seed in UInt64(1)...200 {
            var random = SeededGenerator(seed: seed)
            var budget = BudgetLifecycle(retention: 0.5)
            var inFlight: BudgetLifecycle.Assign?
            var now = at(ms: 0)
            var lastApplied: Double?
            for _ in 0..<200 {
                now = now + .milliseconds(Int64(random.next() % 400))
                switch random.next() % 4 {
                case 0:
                    if let assign = budget.statisticsComplete() {
                        #expect(inFlight == nil, "seed \(seed): two assignments in flight")
                        inFlight = assign
                    }
                case 1:
                    if let assign = budget.tick(now: now) {
                        #expect(inFlight == nil, "seed \(seed): two assignments in flight")
                        inFlight = assign
                    }
                case 2:
                    if let held = budget.compressedRetention, let assign = budget.tighten(to: held / 2) {
                        #expect(inFlight == nil, "seed \(seed): two assignments in flight")
                        inFlight = assign
                    }
                default:
                    guard let assign = inFlight else { continue }
                    let everyCopy = random.next() % 3 != 0
                    budget.assignmentFinished(everyCopyApplied: everyCopy, now: now)
                    inFlight = nil
                    if everyCopy { lastApplied = assign.retention }
                    #expect(
                        budget.compressedRetention == (everyCopy ? assign.retention : nil),
                        "seed \(seed): compressed exactly when every copy applied"
                    )
                }
                if let held = budget.compressedRetention {
                    #expect(held == lastApplied, "seed \(seed): compressed at a retention no copy set applied")
                }
                if case .retrying = budget.phase { #expect(inFlight == nil, "seed \(seed)") }
            }
        }
    }

    /// A copy starts only from a compressed sequence with none in flight; meanwhile the sequence is
    /// still compressed but not tightened, and only that copy's end brings it back.
    @Test func aCopyInFlightHoldsTighteningBackUntilItEnds() {
        var budget = BudgetLifecycle(retention: 0.2)
        #expect(budget.beginCopy(1) == false, "not before the budget is applied")
        _ = budget.statisticsComplete()
        budget.assignmentFinished(everyCopyApplied: true, now: ClusterInstant(elapsed: .zero))
        #expect(budget.beginCopy(1) == true)
        #expect(budget.isCompressed && budget.isCopying && budget.compressedRetention == 0.2)
        #expect(budget.beginCopy(2) == false, "one copy at a time")
        #expect(budget.tighten(to: 0.1) == nil, "no tightening under a copy")
        budget.copyFinished(2)
        #expect(budget.isCopying, "another copy's end changes nothing")
        budget.copyFinished(1)
        #expect(budget.phase == .compressed(retention: 0.2))
        #expect(budget.tighten(to: 0.1) == BudgetLifecycle.Assign(retention: 0.1))

        var reported = BudgetLifecycle(restoredCompressed: true, retention: 0.2)
        #expect(reported.beginCopy(3) == true)
        reported.copyUncompressed()
        reported.copyFinished(3)
        #expect(reported.phase == .gathering, "a copy reported without its budget sends it again")
    }
}

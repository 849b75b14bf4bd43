import ClusterTransport
import ClusterWire
import Logging
import Synchronization
import Testing

@testable import Simulation

/// The simulator's own machinery, then whole schedules: a few seeds pass, a seed replays exactly,
/// and a switched-off protection is caught. (The CI step runs thousands of seeds on the optimised
/// binary: `tessera simulate`.)
@Suite struct SimulationTests {
    @Test func timersRunInDeadlineOrderAndCancelledOnesNever() {
        let scheduler = Scheduler()
        let fired = Mutex<[Int]>([])
        scheduler.schedule(at: .milliseconds(30)) { fired.withLock { $0.append(3) } }
        scheduler.schedule(at: .milliseconds(10)) { fired.withLock { $0.append(1) } }
        let cancelled = scheduler.schedule(at: .milliseconds(20)) { fired.withLock { $0.append(2) } }
        scheduler.schedule(at: .milliseconds(10)) { fired.withLock { $0.append(11) } }
        scheduler.cancel(cancelled)
        #expect(!scheduler.run(until: .seconds(1)) { false })
        #expect(fired.withLock { $0 } == [1, 11, 3])
        #expect(scheduler.now == .milliseconds(30))
    }

    @Test func aCancelledSleepEndsAtOnceWithoutWaitingForItsTimer() {
        let scheduler = Scheduler()
        let outcome = Mutex<String?>(nil)
        let sleeper = Task(executorPreference: scheduler) {
            do {
                try await SimulatedClock(scheduler: scheduler).sleep(for: .seconds(60))
                outcome.withLock { $0 = "slept" }
            } catch {
                outcome.withLock { $0 = "\(type(of: error))" }
            }
        }
        scheduler.schedule(at: .seconds(1)) { sleeper.cancel() }
        #expect(scheduler.run(until: .seconds(120)) { outcome.withLock { $0 } != nil })
        #expect(outcome.withLock { $0 } == "CancellationError")
        #expect(scheduler.now == .seconds(1))
    }

    /// A paused node's timers fire only once the pause ends, as a stopped process's would; another
    /// node's keep their time, and a deferred timer can still be cancelled.
    @Test func aPausedNodesTimersWaitForThePauseToEnd() {
        let scheduler = Scheduler()
        let network = SimulatedNetwork(scheduler: scheduler, seed: 1) { _, _, _, _ in }
        let woke = Mutex<[String: Duration]>([:])
        for name in ["paused", "running"] {
            let node = SimulatedNode(network: network, name: name)
            Task(executorPreference: scheduler) { @Sendable in
                try await node.clock.sleep(for: .seconds(1))
                woke.withLock { $0[name] = scheduler.now }
            }
        }
        let timeout = scheduler.schedule(at: .seconds(2), pausedUntil: network.pausedUntil("paused")) {
            woke.withLock { $0["cancelled"] = scheduler.now }
        }
        network.pause("paused", until: .seconds(5))
        scheduler.schedule(at: .seconds(3)) { scheduler.cancel(timeout) }
        #expect(scheduler.run(until: .seconds(60)) { woke.withLock { $0.count } == 2 })
        #expect(woke.withLock { $0 } == ["running": .seconds(1), "paused": .seconds(5)])
        #expect(!scheduler.run(until: .seconds(60)) { false })
        #expect(woke.withLock { $0["cancelled"] } == nil)
    }

    @Test(arguments: [1, 2] as [UInt64])
    func aScheduleWithFaultsKeepsEveryInvariant(seed: UInt64) {
        let report = Simulation.run(seed: seed)
        #expect(report.passed, "seed \(seed): \(report.violations.joined(separator: "\n"))")
        #expect(report.faults > 0 && report.sequencesCompleted > 0, "seed \(seed) exercised nothing")
    }

    /// The intruder is refused by every node it reaches, and the refusals are the authorization's
    /// (a tenant's certificate reaches only its own tenant's sequences, a client no worker or
    /// coordinator operation), not only malformed input.
    @Test func theIntrudersRequestsAreAllRefused() {
        let report = Simulation.run(seed: 4)
        #expect(report.passed, "\(report.violations.joined(separator: "\n"))")
        #expect(report.intrusions["answered", default: 0] == 0)
        #expect(report.intrusions["PERMISSION_DENIED", default: 0] > 0, "\(report.intrusions)")
    }

    /// A stalled link and a paused node hold frames without resetting connections: requests still
    /// complete, later, and nothing is lost.
    @Test func stallsAndPausesDelayWithoutLosing() throws {
        var settings = SimulationSettings()
        settings.faults = [.stall, .pause]
        // The first of the first ten seeds whose schedule has both kinds.
        let report = try #require(
            (1...10 as ClosedRange<UInt64>).lazy.map { Simulation.run(seed: $0, settings: settings) }.first { report in
                report.trace.contains { $0.contains("stall ") } && report.trace.contains { $0.contains("pause ") }
            },
            "no stall and pause together in seeds 1...10"
        )
        #expect(report.passed, "seed \(report.seed): \(report.violations.joined(separator: "\n"))")
        #expect(report.faults > 0 && report.sequencesCompleted > 0)
    }

    /// A link that delivers every frame twice changes nothing: each connection drops the repeats
    /// (the nodes' warnings show it did), and the invariants hold.
    @Test func framesDeliveredTwiceAreDroppedAndChangeNothing() {
        var settings = SimulationSettings()
        settings.faults = [.duplicate]
        settings.logLevel = .warning
        let report = Simulation.run(seed: 6, settings: settings)
        #expect(report.passed, "\(report.violations.joined(separator: "\n"))")
        #expect(report.faults > 0 && report.sequencesCompleted > 0)
        #expect(report.trace.contains { $0.contains("duplicate ") })
        #expect(report.trace.contains { $0.contains("repeats one this connection already carried") })
    }

    /// Workers time their prefill work on their network's clock. On the simulated one, work that
    /// takes real time takes none, so the figures a primary forwards to its replicas with a decode
    /// step are the same bytes in every replay. They were real microseconds once: seed 369's intruder
    /// mutates such a forwarded step, and `tessera simulate --seed 369` went another way in 5 of 12
    /// runs.
    @Test func prefillWorkIsTimedOnTheSimulatedClock() {
        func spin() -> Int {
            let until = ContinuousClock.now + .milliseconds(2)
            var turns = 0
            while ContinuousClock.now < until { turns += 1 }
            return turns
        }
        var simulated: UInt64 = 0
        var real: UInt64 = 0
        _ = PrefillWork.timed(&simulated, on: SimulatedClock(scheduler: Scheduler())) { spin() }
        _ = PrefillWork.timed(&real, on: ContinuousClock()) { spin() }
        #expect(simulated == 0)
        #expect(real >= 2_000)
    }

    @Test(arguments: [3, 369] as [UInt64])
    func aSeedReplaysExactly(seed: UInt64) {
        let first = Simulation.run(seed: seed)
        for _ in 0..<3 {
            let again = Simulation.run(seed: seed)
            #expect(
                first.trace == again.trace && first.jobs == again.jobs && first.simulatedTime == again.simulatedTime,
                "seed \(seed) replayed differently"
            )
        }
    }

    @Test func answeringBeforeTheReplicasApplyIsCaught() {
        var settings = SimulationSettings()
        settings.weakened = [.replicateBeforeAck]
        // Crashes are what expose it; the first thirty seeds of this mix include one that does.
        settings.faults = [.crash, .partition]
        let caught = (1...30 as ClosedRange<UInt64>).first { !Simulation.run(seed: $0, settings: settings).passed }
        #expect(caught != nil, "no violation in seeds 1...30 with the primary answering before its replicas apply")
    }

    /// The intruder's worker forges statistics for every new shard; taken, they set budgets of their
    /// own and the outputs leave the reference's. No other fault is needed to show it.
    @Test func statisticsFromAWorkerThatHoldsNoCopyAreCaught() {
        var settings = SimulationSettings()
        settings.weakened = [.statisticsFromHolders]
        settings.faults = []
        let caught = (1...10 as ClosedRange<UInt64>).first { !Simulation.run(seed: $0, settings: settings).passed }
        #expect(caught != nil, "no violation in seeds 1...10 with statistics taken from any worker")
    }
}

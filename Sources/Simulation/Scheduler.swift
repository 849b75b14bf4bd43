import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The simulated world's single thread of control: every task of a simulation runs as a job on this
/// executor, one at a time in the order they became ready, and time moves only when no job is ready,
/// straight to the next timer. Given the same seed, the same jobs run in the same order, so a run
/// replays exactly.
package final class Scheduler: TaskExecutor, Sendable {
    private struct Timer {
        var deadline: Duration
        /// Ties broken by scheduling order.
        var order: UInt64
        var action: @Sendable () -> Void
        /// Until when the node the timer belongs to is paused (nil: no node's): a due timer of a
        /// paused node waits for the pause to end, as a stopped process's timers fire only once it
        /// runs again.
        var pausedUntil: (@Sendable () -> Duration)?

        func precedes(_ other: Timer) -> Bool { (deadline, order) < (other.deadline, other.order) }
    }

    private struct State {
        var now = Duration.zero
        var jobs: [UnownedJob] = []
        var nextJob = 0
        var timers: [Timer] = []  // a binary min-heap
        var cancelled: Set<UInt64> = []
        var nextOrder: UInt64 = 0
        var jobsRun = 0
        /// The thread `run` drives the world on; work arriving from any other thread came from a
        /// real clock or thread in the code under test, which would make the run irreproducible.
        var driver: pthread_t?
        var foreignJobs = 0

        mutating func push(_ timer: Timer) {
            timers.append(timer)
            var child = timers.count - 1
            while child > 0 {
                let parent = (child - 1) / 2
                guard timers[child].precedes(timers[parent]) else { break }
                timers.swapAt(child, parent)
                child = parent
            }
        }

        mutating func popTimer() -> Timer? {
            guard !timers.isEmpty else { return nil }
            timers.swapAt(0, timers.count - 1)
            let first = timers.removeLast()
            var parent = 0
            while true {
                let left = 2 * parent + 1
                let right = left + 1
                var smallest = parent
                if left < timers.count, timers[left].precedes(timers[smallest]) { smallest = left }
                if right < timers.count, timers[right].precedes(timers[smallest]) { smallest = right }
                guard smallest != parent else { break }
                timers.swapAt(parent, smallest)
                parent = smallest
            }
            return first
        }

        mutating func popJob() -> UnownedJob? {
            guard nextJob < jobs.count else { return nil }
            defer {
                nextJob += 1
                if nextJob == jobs.count {
                    jobs.removeAll(keepingCapacity: true)
                    nextJob = 0
                }
            }
            return jobs[nextJob]
        }
    }

    private let state = Mutex(State())

    package init() {}

    /// Simulated time since the start.
    package var now: Duration { state.withLock { $0.now } }

    /// Jobs run so far (a measure of the simulation's work).
    package var jobsRun: Int { state.withLock { $0.jobsRun } }

    package func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let current = pthread_self()
        state.withLock { state in
            state.jobs.append(job)
            if let driver = state.driver, pthread_equal(driver, current) == 0 { state.foreignJobs += 1 }
        }
    }

    /// Jobs that arrived from another thread than the one running the world (see `State.driver`).
    package var foreignJobs: Int { state.withLock { $0.foreignJobs } }

    /// Runs `action` once simulated time reaches `deadline` (at once if it has), and not while
    /// `pausedUntil` (the pause of the node it belongs to) lies ahead; the returned token cancels it.
    @discardableResult
    package func schedule(
        at deadline: Duration,
        pausedUntil: (@Sendable () -> Duration)? = nil,
        _ action: @escaping @Sendable () -> Void
    ) -> UInt64 {
        state.withLock { state in
            defer { state.nextOrder += 1 }
            state.push(
                Timer(
                    deadline: max(deadline, state.now),
                    order: state.nextOrder,
                    action: action,
                    pausedUntil: pausedUntil
                )
            )
            return state.nextOrder
        }
    }

    @discardableResult
    package func schedule(
        after delay: Duration,
        pausedUntil: (@Sendable () -> Duration)? = nil,
        _ action: @escaping @Sendable () -> Void
    ) -> UInt64 {
        schedule(at: now + delay, pausedUntil: pausedUntil, action)
    }

    package func cancel(_ token: UInt64) {
        _ = state.withLock { $0.cancelled.insert(token) }
    }

    /// Runs jobs and timers until `done` holds (checked whenever no job is ready) or the next timer
    /// lies past `limit`; returns whether `done` held.
    package func run(until limit: Duration, done: () -> Bool) -> Bool {
        state.withLock { $0.driver = pthread_self() }
        while true {
            while let job = state.withLock({ $0.popJob() }) {
                job.runSynchronously(on: asUnownedTaskExecutor())
                state.withLock { $0.jobsRun += 1 }
            }
            if done() { return true }
            let timer: Timer? = state.withLock { state in
                while let next = state.timers.first, next.deadline <= limit {
                    let timer = state.popTimer()!
                    if state.cancelled.remove(timer.order) != nil { continue }
                    state.now = timer.deadline
                    return timer
                }
                return nil
            }
            guard var timer else { return false }
            // Read outside the lock: the pause lives in the network's state.
            if let resume = timer.pausedUntil?(), resume > timer.deadline {
                timer.deadline = resume
                state.withLock { $0.push(timer) }  // the same order, so its token still cancels it
                continue
            }
            timer.action()
        }
    }
}

/// Time as the simulation sees it: sleeping on this clock is a timer of the scheduler, and a
/// cancelled sleep ends at once with `CancellationError`, as on a real clock.
package struct SimulatedClock: Clock {
    package struct Instant: InstantProtocol {
        var offset: Duration

        package func advanced(by duration: Duration) -> Instant { Instant(offset: offset + duration) }
        package func duration(to other: Instant) -> Duration { other.offset - offset }
        package static func < (lhs: Instant, rhs: Instant) -> Bool { lhs.offset < rhs.offset }
    }

    let scheduler: Scheduler
    /// Until when the node whose clock this is stays paused: its sleeps end no earlier.
    let pausedUntil: (@Sendable () -> Duration)?

    package init(scheduler: Scheduler, pausedUntil: (@Sendable () -> Duration)? = nil) {
        self.scheduler = scheduler
        self.pausedUntil = pausedUntil
    }

    package var now: Instant { Instant(offset: scheduler.now) }
    package var minimumResolution: Duration { .nanoseconds(1) }

    package func sleep(until deadline: Instant, tolerance: Duration?) async throws {
        let sleeper = OneShot()
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                guard sleeper.arm(continuation) else { return }
                let token = scheduler.schedule(at: deadline.offset, pausedUntil: pausedUntil) {
                    sleeper.fire(.success(()))
                }
                sleeper.onCancel { scheduler.cancel(token) }
            }
        } onCancel: {
            sleeper.fire(.failure(CancellationError()))
        }
    }
}

/// A continuation resumed exactly once, by whichever comes first: its timer or a cancellation
/// (which may come before the continuation is armed).
final class OneShot: Sendable {
    private enum State {
        case idle
        case armed(CheckedContinuation<Void, any Error>, cancelTimer: (@Sendable () -> Void)?)
        case done
    }

    private let state = Mutex(State.idle)

    /// Stores the continuation; false (and resumed with `CancellationError`) if already cancelled.
    func arm(_ continuation: CheckedContinuation<Void, any Error>) -> Bool {
        let armed = state.withLock { state -> Bool in
            guard case .idle = state else { return false }
            state = .armed(continuation, cancelTimer: nil)
            return true
        }
        if !armed { continuation.resume(throwing: CancellationError()) }
        return armed
    }

    func onCancel(_ cancelTimer: @escaping @Sendable () -> Void) {
        state.withLock { state in
            if case .armed(let continuation, nil) = state { state = .armed(continuation, cancelTimer: cancelTimer) }
        }
    }

    func fire(_ result: Result<Void, any Error>) {
        let taken = state.withLock { state -> (CheckedContinuation<Void, any Error>, (@Sendable () -> Void)?)? in
            defer { state = .done }
            if case .armed(let continuation, let cancelTimer) = state { return (continuation, cancelTimer) }
            return nil
        }
        guard let (continuation, cancelTimer) = taken else { return }
        if case .failure = result { cancelTimer?() }
        continuation.resume(with: result)
    }
}

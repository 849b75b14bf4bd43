#if canImport(Glibc)
import Glibc
#endif

/// Prefill work (expanding a prompt, attention profiles, compression) and audited decode steps yield
/// the cores to decode steps: a thread running them moves itself to Linux's `SCHED_IDLE` class
/// first. A prefill runs for seconds, an audited step decodes the full cache beside the compressed
/// one, and a step runs for milliseconds, so the step's latency is what contention hurts. Under
/// `SCHED_IDLE` a thread that wakes to serve a step (an event loop, a decode thread) preempts a
/// running prefill at once, where against a lower nice value it may wait out the prefill's time
/// slice at every hop of the step; the prefill still gets every cycle no step wants. Linux only
/// (elsewhere a thread's priority is the process's); one system call per prefill job.
enum PrefillPriority {
    /// Linux's `SCHED_IDLE` (include/uapi/linux/sched.h), which Glibc's module does not export.
    static let idlePolicy: Int32 = 5

    /// Moves the calling thread to `SCHED_IDLE` (an unprivileged thread may lower its own class).
    /// On Linux a scheduling policy belongs to a thread, and pid 0 names the calling one.
    static func apply() {
        #if os(Linux)
        var parameters = sched_param(sched_priority: 0)
        _ = sched_setscheduler(0, idlePolicy, &parameters)
        #endif
    }
}

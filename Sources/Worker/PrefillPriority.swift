#if canImport(Glibc)
import Glibc
#endif

/// Prefill work (expanding a prompt, attention profiles, compression) yields the cores to decode
/// steps: a thread running it is set to `niceness` first, so where a step and a prefill share a core
/// the step gets about nine tenths of it (CFS weights 1024 : 110) instead of half. A prefill runs for
/// seconds and a step for milliseconds, so the step's latency is what contention hurts; the prefill
/// still gets every cycle no step wants. Linux only (elsewhere a thread's nice value is the
/// process's); one `setpriority` call per prefill job, microseconds against its milliseconds.
enum PrefillPriority {
    static let niceness: Int32 = 10

    /// Lowers the calling thread's priority to `niceness` (an unprivileged thread can lower its own).
    /// On Linux a nice value belongs to a thread, and `who` 0 names the calling one.
    static func apply() {
        #if os(Linux)
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, niceness)
        #endif
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// CPU time spent by threads and processes, for benchmarks that report what work costs beside how
/// long it took: on a shared machine a wait for the scheduler lengthens a request without costing
/// anything, and the CPU time tells the two apart. Linux only; elsewhere nil.
public enum ProcessCPU {
    /// The CPU time the calling thread has used, in seconds (`CLOCK_THREAD_CPUTIME_ID`).
    public static func threadSeconds() -> Double? {
        #if os(Linux)
        var time = timespec()
        guard clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time) == 0 else { return nil }
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
        #else
        return nil
        #endif
    }

    /// The calling thread's CPU time since `start`, an earlier `threadSeconds()` reading; nil when
    /// either reading is.
    public static func threadSeconds(since start: Double?) -> Double? {
        guard let start, let now = threadSeconds() else { return nil }
        return now - start
    }

    /// The CPU time this process has used, in seconds: every thread, those that ended included
    /// (`getrusage`, user and system).
    public static func ownSeconds() -> Double? {
        #if os(Linux)
        var usage = rusage()
        guard getrusage(RUSAGE_SELF.rawValue, &usage) == 0 else { return nil }
        func seconds(_ time: timeval) -> Double { Double(time.tv_sec) + Double(time.tv_usec) / 1e6 }
        return seconds(usage.ru_utime) + seconds(usage.ru_stime)
        #else
        return nil
        #endif
    }

    /// The CPU time process `pid` has used, in seconds: the run times of its live threads, from
    /// `/proc/PID/task/*/schedstat` in nanoseconds (`/proc/PID/stat` counts 10 ms ticks, too coarse
    /// for windows of milliseconds). Threads that already ended are not counted, so compare two
    /// readings of a process whose threads live on (an event loop, a thread pool). nil when the
    /// process is gone.
    public static func seconds(pid: Int32) -> Double? {
        #if os(Linux)
        let tasks = "/proc/\(pid)/task"
        guard let directory = opendir(tasks) else { return nil }
        defer { closedir(directory) }
        var nanoseconds: UInt64 = 0
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) {
                String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard name.first?.isNumber == true,
                let text = ProcessMemory.contents(of: "\(tasks)/\(name)/schedstat"),
                let field = text.split(separator: " ").first, let runtime = UInt64(field)
            else { continue }
            nanoseconds += runtime
        }
        return Double(nanoseconds) / 1e9
        #else
        return nil
        #endif
    }
}

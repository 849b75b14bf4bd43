#if canImport(Glibc)
import Glibc
#endif

/// This process's memory as the kernel sees it.
public enum ProcessMemory {
    /// Resident set size in bytes (second field of `/proc/self/statm`, in pages); 0 where unavailable.
    public static func residentBytes() -> UInt64 {
        #if os(Linux)
        guard let statm = contents(of: "/proc/self/statm") else { return 0 }
        let fields = statm.split(separator: " ")
        guard fields.count >= 2, let pages = UInt64(fields[1]) else { return 0 }
        return pages * UInt64(sysconf(Int32(_SC_PAGESIZE)))
        #else
        return 0
        #endif
    }

    /// The memory this process may use: the machine's physical memory, or its control group's limit
    /// (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`) when that is lower, as in a container.
    public static func availableBytes() -> UInt64 {
        #if os(Linux)
        let physical = UInt64(max(0, sysconf(Int32(_SC_PHYS_PAGES)))) * UInt64(max(0, sysconf(Int32(_SC_PAGESIZE))))
        // "max" (no limit) does not parse, and is left out.
        let limits = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"].compactMap {
            contents(of: $0).flatMap { UInt64($0.split(separator: "\n").first ?? "") }
        }
        return ([physical] + limits).filter { $0 > 0 }.min() ?? physical
        #else
        return 0
        #endif
    }

    /// The coordinator's memory limit when none is configured: half of `availableBytes()` for the
    /// accounted K/V bytes of all workers, which leaves room for what the processes hold beside them
    /// (RSS ran up to 1.2 × the accounted bytes + 64 MiB in the measurements in README). 0 (unlimited)
    /// where the machine's memory cannot be read.
    public static func defaultLimitBytes() -> UInt64 { availableBytes() / 2 }

    /// Has glibc keep freed blocks of up to 32 MiB (tensors, frames) in the heap for the next
    /// allocation instead of mapping and unmapping each one: every fresh mapping costs a page fault
    /// and a zeroed page per 4 KiB, about 1.3 GB/s on the machine this was measured on against
    /// memory bandwidth for reused memory, which dominated ingest and prefill. At most four arenas.
    /// A process that must keep its resident memory close to what it holds calls `releaseFreePages`
    /// when it notices the difference. A no-op off glibc.
    public static func reuseLargeFrees() {
        #if os(Linux)
        guard let mallopt = glibc("mallopt", as: (@convention(c) (Int32, Int32) -> Int32).self) else { return }
        _ = mallopt(-3, 32 << 20)  // M_MMAP_THRESHOLD (glibc's largest)
        _ = mallopt(-1, 64 << 20)  // M_TRIM_THRESHOLD: no trimming at every free at the heap's top
        _ = mallopt(-8, 4)  // M_ARENA_MAX
        #endif
    }

    /// Returns free pages inside the heap to the kernel (`malloc_trim(0)`).
    public static func releaseFreePages() {
        #if os(Linux)
        guard let trim = glibc("malloc_trim", as: (@convention(c) (Int) -> Int32).self) else { return }
        _ = trim(0)
        #endif
    }

    #if os(Linux)
    /// The first `limit` bytes of a small file (a /proc or /sys entry); nil when it cannot be read.
    static func contents(of path: String, limit: Int = 128) -> String? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: limit)
        var count = 0
        // /proc files can come in several reads.
        while count < limit {
            let got = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + count, limit - count) }
            guard got > 0 else { break }
            count += got
        }
        guard count > 0 else { return nil }
        return String(decoding: buffer[0..<count], as: UTF8.self)
    }

    #endif
}

#if os(Linux)
/// A glibc function the Swift Glibc module does not export (malloc tuning, GNU extensions such as
/// `setns` and `ppoll`), looked up by name.
package func glibc<F>(_ name: String, as _: F.Type) -> F? {
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), name) else { return nil }
    return unsafeBitCast(symbol, to: F.self)
}
#endif

#if canImport(Glibc)
import Glibc
#endif

/// This process's memory as the kernel sees it.
public enum ProcessMemory {
    /// Resident set size in bytes (second field of `/proc/self/statm`, in pages); 0 where unavailable.
    public static func residentBytes() -> UInt64 {
        #if os(Linux)
        let fd = open("/proc/self/statm", O_RDONLY)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 128)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return 0 }
        let fields = buffer[0..<count].split(separator: UInt8(ascii: " "))
        guard fields.count >= 2, let pages = UInt64(String(decoding: fields[1], as: UTF8.self)) else { return 0 }
        return pages * UInt64(sysconf(Int32(_SC_PAGESIZE)))
        #else
        return 0
        #endif
    }

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
    /// glibc's malloc tuning functions are not in the Swift Glibc module; they are looked up by name.
    private static func glibc<F>(_ name: String, as _: F.Type) -> F? {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), name) else { return nil }
        return unsafeBitCast(symbol, to: F.self)
    }
    #endif
}

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

    /// Has glibc hand large freed blocks (tensors) back to the kernel, so that resident memory follows
    /// the bytes actually held: blocks of 256 KiB and more are mapped and unmapped directly (a fixed
    /// threshold; glibc would otherwise raise it after the first large free), and at most four arenas
    /// keep small freed blocks. A no-op off glibc.
    public static func returnLargeFreesToTheSystem() {
        #if os(Linux)
        guard let mallopt = glibc("mallopt", as: (@convention(c) (Int32, Int32) -> Int32).self) else { return }
        _ = mallopt(-3, 256 << 10)  // M_MMAP_THRESHOLD
        _ = mallopt(-8, 4)  // M_ARENA_MAX
        #endif
    }

    /// Returns free pages inside the heap to the kernel (`malloc_trim(0)`); after large frees.
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

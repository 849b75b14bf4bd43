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
}

import ArgumentParser
import ClusterSecurity

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Writing to the standard streams without Foundation: stdout carries results, stderr progress and errors.
enum Terminal {
    static func error(_ text: String) { write(2, text) }
    static func output(_ text: String) { write(1, text) }

    private static func write(_ descriptor: Int32, _ text: String) {
        var text = text
        text.withUTF8 { bytes in
            var offset = 0
            while offset < bytes.count {
                let written = unistd_write(descriptor, bytes.baseAddress! + offset, bytes.count - offset)
                if written <= 0 { return }
                offset += written
            }
        }
    }

    /// Whether stderr is a terminal, so progress can redraw one line in place.
    static var stderrIsTerminal: Bool { isatty(2) == 1 }

    static var onlineProcessors: Int { Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) }
}

private func unistd_write(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Int {
    #if canImport(Glibc) || canImport(Musl) || canImport(Darwin)
    return write(fd, buffer, count)
    #endif
}

/// Refuses a command line: one line on stderr naming what was wrong and what is allowed, exit 64.
extension Terminal {
    /// The line every process started with `--insecure` prints on stderr, whatever its log level.
    static func warnInsecure() { error("warning: \(TransportSecurity.insecureWarning)\n") }
}

func usageFailure(_ message: String) -> ExitCode {
    Terminal.error("error: \(message)\n")
    return ExitCode(64)
}

extension String {
    var trimmed: String {
        String(drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
    }
}

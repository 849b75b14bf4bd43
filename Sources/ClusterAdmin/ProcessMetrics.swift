public import Prometheus
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The standard process metrics Prometheus's own client libraries export (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, ...), read from `/proc/self` when `/metrics`
/// is scraped, so that every Tessera process is watched like any other service. Linux only; elsewhere
/// they are not exported.
public final class ProcessMetrics: Sendable {
    /// The names exported.
    public static var names: [String] { [cpuSeconds, resident, virtual, openFDs, maxFDs, startTime].map(\.name) }

    private static var cpuSeconds: MetricNameDescriptor {
        MetricNameDescriptor(
            namespace: "process",
            metricName: "cpu_seconds",
            unitName: "total",
            helpText: "Total user and system CPU time spent in seconds."
        )
    }
    private static var resident: MetricNameDescriptor {
        MetricNameDescriptor(
            namespace: "process",
            metricName: "resident_memory",
            unitName: "bytes",
            helpText: "Resident memory size in bytes."
        )
    }
    private static var virtual: MetricNameDescriptor {
        MetricNameDescriptor(
            namespace: "process",
            metricName: "virtual_memory",
            unitName: "bytes",
            helpText: "Virtual memory size in bytes."
        )
    }
    private static var openFDs: MetricNameDescriptor {
        MetricNameDescriptor(
            namespace: "process",
            metricName: "open",
            unitName: "fds",
            helpText: "Number of open file descriptors."
        )
    }
    private static var maxFDs: MetricNameDescriptor {
        MetricNameDescriptor(
            namespace: "process",
            metricName: "max",
            unitName: "fds",
            helpText: "Maximum number of open file descriptors."
        )
    }
    private static var startTime: MetricNameDescriptor {
        MetricNameDescriptor(
            namespace: "process",
            metricName: "start_time",
            unitName: "seconds",
            helpText: "Start time of the process since unix epoch in seconds."
        )
    }

    private let registry: PrometheusCollectorRegistry
    /// CPU seconds already added to the counter (it only counts up by increments).
    private let countedCPU = Mutex<Double>(0)

    public init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
    }

    /// Reads the process's figures and writes them into the registry.
    public func update() {
        #if os(Linux)
        guard let stat = Self.stat() else { return }
        let cpu = stat.cpuSeconds
        let added = countedCPU.withLock { counted in
            defer { counted = max(counted, cpu) }
            return max(0, cpu - counted)
        }
        registry.makeCounter(descriptor: Self.cpuSeconds).increment(by: added)
        registry.makeGauge(descriptor: Self.resident).set(Double(stat.residentBytes))
        registry.makeGauge(descriptor: Self.virtual).set(Double(stat.virtualBytes))
        registry.makeGauge(descriptor: Self.openFDs).set(Double(Self.openFileDescriptors()))
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 {
            registry.makeGauge(descriptor: Self.maxFDs).set(Double(limit.rlim_cur))
        }
        if let bootTime = Self.bootTime() {
            registry.makeGauge(descriptor: Self.startTime).set(bootTime + stat.startSecondsAfterBoot)
        }
        #endif
    }

    #if os(Linux)
    /// The fields of `/proc/self/stat` this needs.
    struct Stat {
        var cpuSeconds: Double
        var virtualBytes: UInt64
        var residentBytes: UInt64
        var startSecondsAfterBoot: Double
    }

    static func stat() -> Stat? {
        guard let text = ProcessMemory.contents(of: "/proc/self/stat", limit: 1024),
            let commEnd = text.lastIndex(of: ")")
        else { return nil }
        // Fields after the command name (which may hold spaces), starting at field 3 (state).
        let fields = text[text.index(after: commEnd)...].split(separator: " ")
        guard fields.count > 21, let user = Double(fields[11]), let system = Double(fields[12]),
            let start = Double(fields[19]), let virtual = UInt64(fields[20]), let pages = UInt64(fields[21])
        else { return nil }
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        return Stat(
            cpuSeconds: (user + system) / ticks,
            virtualBytes: virtual,
            residentBytes: pages * UInt64(sysconf(Int32(_SC_PAGESIZE))),
            startSecondsAfterBoot: start / ticks
        )
    }

    /// Seconds since the epoch at which the machine booted (`btime` in `/proc/stat`).
    static func bootTime() -> Double? {
        guard let text = ProcessMemory.contents(of: "/proc/stat", limit: 1 << 16) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("btime ") {
            return Double(line.dropFirst("btime ".count))
        }
        return nil
    }

    /// Entries of `/proc/self/fd`, less the one reading it.
    static func openFileDescriptors() -> Int {
        guard let directory = opendir("/proc/self/fd") else { return 0 }
        defer { closedir(directory) }
        var count = 0
        while let entry = readdir(directory) {
            if entry.pointee.d_name.0 != CChar(UInt8(ascii: ".")) { count += 1 }
        }
        return max(0, count - 1)
    }
    #endif
}

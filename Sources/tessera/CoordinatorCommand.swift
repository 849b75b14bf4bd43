import ArgumentParser
import ClusterAdmin
import ClusterTransport
import ClusterWire
import Coordinator
import Logging
import ServiceLifecycle

struct CoordinatorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "coordinator",
        abstract: "Run the coordinator: membership, placement, admission and per-layer budgets.",
        discussion: """
            Prints `READY {"role":"coordinator","port":P,"pid":N}` on stdout once it listens. Workers and \
            clients connect to that port. SIGINT or SIGTERM stops it gracefully (exit 0).
            """
    )

    @Option(help: "Address to listen on, host:port (port 0 picks a free port).")
    var listen = "127.0.0.1:0"

    @Option(
        help:
            "Cluster-wide limit on accounted KV bytes; 0 = unlimited. Default: half of this machine's memory (or of its cgroup's limit), logged at start."
    )
    var memoryLimitBytes: UInt64?

    @Option(
        name: .customLong("tenant-quota"),
        help: ArgumentHelp(
            "A tenant's limit on accounted KV bytes, TENANT=BYTES (repeatable).",
            valueName: "tenant=bytes"
        )
    )
    var tenantQuotas: [String] = []

    @Option(
        help: "Copies of each shard of a sequence, on distinct workers (1...16; fewer while fewer workers are live)."
    )
    var replication = 2

    @Option(
        help:
            "Under memory pressure, admitted sequences are tightened down to this retention ratio, never below (0...1)."
    )
    var floorRatio = 0.02

    @Flag(
        help:
            "This coordinator starts a new cluster: it admits sequences at once. Without it, it may be replacing a coordinator, and admits nothing for the failure detector's dead-after time (3 s) while workers re-register."
    )
    var newCluster = false

    @OptionGroup var faults: FaultOptions

    @OptionGroup var security: SecurityOptions

    @OptionGroup var process: ProcessOptions

    func run() async throws {
        let logger = try process.bootstrapLogging()
        let address: NodeAddress
        do { address = try NodeAddress(parsing: listen) } catch { throw usageFailure("--listen: \(error.message)") }
        guard (1...16).contains(replication) else {
            throw usageFailure("--replication must be in 1...16, got \(replication)")
        }
        guard (0...1).contains(floorRatio) else {
            throw usageFailure("--floor-ratio must be in 0...1, got \(floorRatio)")
        }
        var quotas: [String: UInt64] = [:]
        for quota in tenantQuotas {
            let parts = quota.split(separator: "=", maxSplits: 1)
            guard parts.count == 2, !parts[0].isEmpty, let bytes = UInt64(parts[1]) else {
                throw usageFailure("--tenant-quota must look like TENANT=BYTES (e.g. alice=1073741824), got '\(quota)'")
            }
            quotas[String(parts[0])] = bytes
        }
        let injector = try faults.injector()
        let transport = try security.security(name: "coordinator")
        let limit = memoryLimitBytes ?? ProcessMemory.defaultLimitBytes()
        logger.info(
            "memory limit",
            metadata: [
                "bytes": "\(limit)",
                "source": "\(memoryLimitBytes == nil ? "half of this machine's memory" : "--memory-limit-bytes")",
            ]
        )
        let service = try CoordinatorService(
            configuration: CoordinatorConfiguration(
                incarnation: wallClockIncarnation(),
                listen: address,
                security: transport,
                memoryLimitBytes: limit,
                tenantQuotaBytes: quotas,
                floorRatio: floorRatio,
                replication: replication,
                startsNewCluster: newCluster,
                faults: injector
            ),
            logger: logger
        )
        let adminPort = AsyncValue<Int>()
        let admin = try adminService(
            process,
            security: transport,
            settings: FaultOptions.setting(injector),
            logger: logger
        ) {
            adminPort.set($0)
        }
        try await runServices(
            [
                admin,
                ClosureService {
                    try await service.run { port in
                        printReady([
                            ("role", jsonString("coordinator")), ("port", "\(port)"),
                            ("adminPort", "\(await adminPort.value)"), ("pid", "\(processID)"),
                        ])
                    }
                },
            ],
            options: process,
            traced: ("tessera-coordinator", "coordinator"),
            logger: logger
        )
    }
}

extension CoordinatorCommand {
    /// The coordinator flags that carry a configuration file's coordinator section.
    static func arguments(_ settings: CoordinatorSettings) -> [String] {
        let memory = settings.memory
        return [
            "--replication", "\(settings.replication)", "--floor-ratio", "\(memory.floorRatio)", "--faults",
            settings.faults,
        ]
            + (memory.limitBytes.map { ["--memory-limit-bytes", "\($0)"] } ?? [])
            + memory.tenantQuotas.sorted { $0.key < $1.key }.flatMap { ["--tenant-quota", "\($0.key)=\($0.value)"] }
    }
}

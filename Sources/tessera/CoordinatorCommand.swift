import ArgumentParser
import ClusterTransport
import ClusterWire
import Coordinator
import ServiceLifecycle

struct CoordinatorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "coordinator",
        abstract: "Run the coordinator: membership, placement, admission and per-layer budgets.",
        discussion: """
            Prints `READY {"role":"coordinator","port":P,"pid":N}` on stdout once it listens. Workers and
            clients connect to that port. SIGINT or SIGTERM stops it gracefully (exit 0).
            """
    )

    @Option(help: "Address to listen on, host:port (port 0 picks a free port).")
    var listen = "127.0.0.1:0"

    @Option(help: "Cluster-wide limit on accounted KV bytes (0 = unlimited).")
    var memoryLimitBytes: UInt64 = 0

    @OptionGroup var process: ProcessOptions

    func run() async throws {
        let logger = try process.bootstrapLogging()
        let address: NodeAddress
        do { address = try NodeAddress(parsing: listen) } catch { throw usageFailure("--listen: \(error.message)") }
        let service = try CoordinatorService(
            configuration: CoordinatorConfiguration(
                incarnation: wallClockIncarnation(), listen: address,
                memoryLimitBytes: memoryLimitBytes),
            logger: logger)
        let adminPort = AsyncValue<Int>()
        let admin = try adminService(process, logger: logger) { adminPort.set($0) }
        try await runServices(
            [admin, ClosureService {
                try await service.run { port in
                    printReady([("role", jsonString("coordinator")), ("port", "\(port)"),
                                ("adminPort", "\(await adminPort.value)"), ("pid", "\(processID)")])
                }
            }], options: process, logger: logger)
    }
}

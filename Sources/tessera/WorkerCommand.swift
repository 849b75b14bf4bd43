import ArgumentParser
import ClusterTransport
import ClusterWire
import KVCacheCore
import ServiceLifecycle
import Worker

struct WorkerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker",
        abstract: "Run a worker: holds KV-cache shards, compresses them to assigned budgets, serves decode.",
        discussion: """
            Registers with the coordinator, then prints `READY {"role":"worker","port":P,"pid":N,...}` on \
            stdout. Clients send prefill and decode to the printed port. SIGINT or SIGTERM stops it.
            """
    )

    @Option(help: "The coordinator's address, host:port.")
    var coordinator: String

    @Option(help: "Address to listen on for clients, host:port (port 0 picks a free port).")
    var listen = "127.0.0.1:0"

    @Option(
        help: ArgumentHelp(
            "The host clients and other workers reach this worker by (needed when --listen is on 0.0.0.0 or ::, "
                + "e.g. a pod's IP); default: the --listen host.",
            valueName: "host"
        )
    )
    var advertiseHost: String?

    @Option(help: "This worker's node id (unique in the cluster).")
    var nodeID = "worker-\(getpid())"

    @Option(help: "Storage type of cached rows: f32 or f16.")
    var storage = "f32"

    @OptionGroup var faults: FaultOptions

    @OptionGroup var security: SecurityOptions

    @OptionGroup var process: ProcessOptions

    func run() async throws {
        let logger = try process.bootstrapLogging()
        let coordinatorAddress: NodeAddress
        let listenAddress: NodeAddress
        do {
            coordinatorAddress = try NodeAddress(parsing: coordinator)
            listenAddress = try NodeAddress(parsing: listen)
        } catch {
            throw usageFailure(error.message)
        }
        if advertiseHost == nil, ["0.0.0.0", "::", "[::]"].contains(listenAddress.host) {
            throw usageFailure(
                "--listen \(listen) accepts on every interface but names none to register; give --advertise-host"
            )
        }
        if let advertiseHost, advertiseHost.isEmpty || advertiseHost.contains(where: \.isWhitespace) {
            throw usageFailure("--advertise-host must be a host name or address, got '\(advertiseHost)'")
        }
        guard let scalar = ScalarType(rawValue: storage) else {
            throw usageFailure("unknown storage '\(storage)'; allowed: f32, f16")
        }
        let injector = try faults.injector()
        let transport = try security.security(name: nodeID)
        let service = WorkerService(
            configuration: WorkerConfiguration(
                nodeID: nodeID,
                incarnation: wallClockIncarnation(),
                listen: listenAddress,
                coordinator: coordinatorAddress,
                security: transport,
                storage: scalar,
                faults: injector,
                advertisedHost: advertiseHost
            ),
            logger: logger
        )
        let id = nodeID
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
                DrainingWorker(service: service) { port in
                    printReady([
                        ("role", jsonString("worker")), ("port", "\(port)"),
                        ("adminPort", "\(await adminPort.value)"), ("pid", "\(processID)"),
                        ("nodeID", jsonString(id)),
                    ])
                },
            ],
            options: process,
            traced: ("tessera-worker", id),
            logger: logger
        )
    }
}

/// The worker as a service: told to stop (SIGTERM, SIGINT, its lifeline closing), it first leaves the
/// cluster, so that the coordinator moves its shards to their other copies at once, then stops.
struct DrainingWorker: Service {
    let service: WorkerService
    let onReady: @Sendable (Int) async -> Void

    func run() async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await service.run(onReady: onReady) }
            group.addTask {
                try await gracefulShutdown()
                await service.leave()
            }
            do { try await group.next() } catch is CancellationError {}
            group.cancelAll()
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif

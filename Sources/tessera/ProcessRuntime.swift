import ArgumentParser
import ClusterAdmin
import ClusterSecurity
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization
import UnixSignals

/// Options every long-running process takes.
struct ProcessOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error or critical.")
    var logLevel = "info"

    @Flag(help: "Exit when standard input closes (the lifeline a parent process holds).")
    var exitOnStdinEof = false

    @Option(
        help:
            "Port of the admin HTTP endpoint (GET /metrics in Prometheus text, GET /healthz, GET and PUT /faults); 0 picks one."
    )
    var adminPort = 0

    @Option(help: "Host the admin endpoint binds; another than loopback needs --admin-tls or --admin-token-file.")
    var adminHost = "127.0.0.1"

    @Flag(
        help: """
            Serve the admin endpoint over HTTPS with this process's certificate (scrapers verify it \
            against the cluster's ca.pem; no client certificate is asked for). Needs the certificates, \
            not --insecure. Changing a setting still needs the --admin-token-file token.
            """
    )
    var adminTls = false

    @Option(
        help: ArgumentHelp(
            "File holding the bearer token that PUT on the admin endpoint needs (at least 16 bytes); without it, settings are read-only.",
            valueName: "path"
        )
    )
    var adminTokenFile: String?

    @OptionGroup(title: "Tracing") var tracing: TracingOptions

    func bootstrapLogging() throws -> Logger {
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw usageFailure(
                "unknown log level '\(logLevel)'; allowed: trace, debug, info, notice, warning, error, critical"
            )
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        return Logger(label: "tessera")
    }
}

/// Adapts a `run` closure to ServiceLifecycle: graceful shutdown cancels it, and a run that ends
/// by that cancellation counts as a clean exit.
struct ClosureService: Service {
    let body: @Sendable () async throws -> Void
    func run() async throws {
        do {
            try await cancelWhenGracefulShutdown { try await body() }
        } catch is CancellationError {
            return
        }
    }
}

/// The admin endpoint as a service; reports its bound port.
func adminService(
    _ options: ProcessOptions,
    security: TransportSecurity,
    settings: [String: AdminSetting] = [:],
    logger: Logger,
    onListening: @escaping @Sendable (Int) -> Void
) throws
    -> ClosureService
{
    guard (0...65535).contains(options.adminPort) else {
        throw usageFailure("--admin-port must be in 0...65535, got \(options.adminPort)")
    }
    var token: AdminToken?
    if let path = options.adminTokenFile {
        do { token = try AdminToken(file: path) } catch { throw usageFailure("--admin-token-file: \(error.message)") }
    }
    var tls: AdminServer.TLS?
    if options.adminTls {
        guard case .mutualTLS(let credentials) = security else {
            throw usageFailure("--admin-tls serves this process's certificate; it needs --certs, not --insecure")
        }
        tls = AdminServer.TLS { credentials.adminServerHandler() }
    }
    guard token != nil || tls != nil || ["127.0.0.1", "::1", "localhost"].contains(options.adminHost) else {
        throw usageFailure(
            "--admin-host \(options.adminHost) is reachable from other hosts; give --admin-tls or "
                + "--admin-token-file too, or bind 127.0.0.1"
        )
    }
    let registry = MetricsBootstrap.bootstrap()
    let server = AdminServer(
        host: options.adminHost,
        port: options.adminPort,
        registry: registry,
        settings: settings,
        token: token,
        tls: tls,
        logger: logger,
        onListening: onListening
    )
    return ClosureService { try await server.run() }
}

/// Runs `services` until SIGINT/SIGTERM (graceful: exit 0) or, with the lifeline, until stdin closes.
/// With `traced` (the process's service name and instance), traces are exported when
/// `options.tracing` says so; the exporter stops last, so it flushes the others' final spans.
func runServices(
    _ services: [any Service],
    options: ProcessOptions,
    traced: (service: String, instance: String)? = nil,
    logger: Logger
) async throws {
    let exporter = try traced.flatMap {
        try options.tracing.bootstrap(service: $0.service, instance: $0.instance, logger: logger)
    }
    var all = ([exporter].compactMap { $0 } + services).map {
        ServiceGroupConfiguration.ServiceConfiguration(
            service: $0,
            successTerminationBehavior: .gracefullyShutdownGroup,
            failureTerminationBehavior: .gracefullyShutdownGroup
        )
    }
    if options.exitOnStdinEof {
        all.append(
            .init(service: ClosureService(body: waitForStdinEOF), successTerminationBehavior: .gracefullyShutdownGroup)
        )
    }
    let group = ServiceGroup(
        configuration: ServiceGroupConfiguration(
            services: all,
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger
        )
    )
    try await group.run()
}

/// Returns when standard input reaches end-of-file: the parent holding the other end is gone. Nobody
/// waits for this process's answers any more, so if the graceful shutdown that follows has not ended
/// within `lifelineGrace` (a prefill computing on a worker's thread pool does not observe
/// cancellation; killed launchers left workers behind for half a minute), the process exits anyway.
@Sendable func waitForStdinEOF() async throws {
    let channel = try await NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .takingOwnershipOfDescriptor(input: 0) { channel in
            channel.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
            }
        }
    try await channel.executeThenClose { inbound, _ in
        for try await _ in inbound.cancelOnGracefulShutdown() {}
    }
    guard !Task.isShuttingDownGracefully else { return }
    MultiThreadedEventLoopGroup.singleton.any().scheduleTask(in: lifelineGrace) {
        Terminal.error("the parent process is gone and shutting down took over \(lifelineGrace); exiting\n")
        exit(0)
    }
}

/// How long a process whose parent is gone may take to shut down gracefully.
let lifelineGrace = TimeAmount.seconds(5)

/// Prints the one machine-readable line a parent waits for.
func printReady(_ fields: [(String, String)]) {
    let body = fields.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",")
    Terminal.output("READY {\(body)}\n")
}

func jsonString(_ text: String) -> String {
    var out = "\""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out + "\""
}

var processID: Int32 { getpid() }

#if canImport(Glibc)
import Glibc
#endif

/// Nanoseconds since the epoch: a restarted process gets a higher incarnation than its previous life.
func wallClockIncarnation() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// A value set once by one task and awaited by others.
final class AsyncValue<T: Sendable>: Sendable {
    private let state = Mutex<(value: T?, waiters: [CheckedContinuation<T, Never>])>((nil, []))

    func set(_ value: T) {
        let waiters = state.withLock { state in
            state.value = value
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume(returning: value) }
    }

    var value: T {
        get async {
            await withCheckedContinuation { continuation in
                let ready = state.withLock { state -> T? in
                    if let value = state.value { return value }
                    state.waiters.append(continuation)
                    return nil
                }
                if let ready { continuation.resume(returning: ready) }
            }
        }
    }
}

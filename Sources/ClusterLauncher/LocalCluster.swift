public import ClusterTransport
public import Logging
import Subprocess
public import SystemPackage
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A coordinator and N workers as child processes of this one, each started with a lifeline (they exit
/// when their standard input closes, so none outlives this process even if it is killed) and stopped
/// with SIGTERM, then SIGKILL, when the scope ends.
public struct LocalCluster: Sendable {
    public var coordinator: NodeAddress
    public var coordinatorPID: Int32
    public var workers: [(nodeID: String, address: NodeAddress, pid: Int32)]

    public struct Options: Sendable {
        public var binary: FilePath
        public var workers: Int
        /// Extra arguments for every child (e.g. `--config PATH`, `--log-level warning`).
        public var childArguments: [String]
        /// Extra arguments for the coordinator alone and for every worker.
        public var coordinatorArguments: [String] = []
        public var workerArguments: [String] = []
        /// Where children's stderr goes: inherited from this process, or discarded.
        public var inheritStandardError: Bool
        public var readyTimeout: Duration
        /// Whether a worker process may exit while the cluster is in use (fault injection kills them);
        /// otherwise any exit ends the scope with an error.
        public var toleratesWorkerExits = false

        public init(
            binary: FilePath, workers: Int, childArguments: [String] = [], inheritStandardError: Bool = true,
            readyTimeout: Duration = .seconds(60)
        ) {
            self.binary = binary
            self.workers = workers
            self.childArguments = childArguments
            self.inheritStandardError = inheritStandardError
            self.readyTimeout = readyTimeout
        }
    }

    /// The running `tessera` binary's path.
    public static var currentBinary: FilePath {
        var buffer = [CChar](repeating: 0, count: 4096)
        let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        let bytes = buffer[0..<max(0, length)].map { UInt8(bitPattern: $0) }
        return FilePath(String(decoding: bytes, as: UTF8.self))
    }

    /// The `tessera` beside the running executable (tests run next to it); `TESSERA_BINARY` overrides.
    public static var siblingBinary: FilePath {
        if let path = getenv("TESSERA_BINARY") { return FilePath(String(cString: path)) }
        var directory = currentBinary
        directory.removeLastComponent()
        return directory.appending("tessera")
    }

    /// Starts the cluster, waits until every process printed its READY line, runs `body`, stops them.
    public static func withCluster<T: Sendable>(
        _ options: Options, logger: Logger, _ body: @escaping @Sendable (LocalCluster) async throws -> T
    ) async throws -> T {
        try await withThrowingTaskGroup(of: T?.self) { group in
            defer { group.cancelAll() }
            let coordinator = try await spawn(
                options, arguments: ["coordinator", "--listen", "127.0.0.1:0"] + options.coordinatorArguments,
                name: "coordinator", in: &group)
            let address = NodeAddress(host: "127.0.0.1", port: coordinator.port)
            var workers: [(nodeID: String, address: NodeAddress, pid: Int32)] = []
            for index in 0..<options.workers {
                let nodeID = "worker-\(index + 1)"
                let ready = try await spawn(
                    options,
                    arguments: ["worker", "--coordinator", address.description, "--listen", "127.0.0.1:0",
                                "--node-id", nodeID] + options.workerArguments,
                    name: nodeID, in: &group)
                workers.append((nodeID, NodeAddress(host: "127.0.0.1", port: ready.port), ready.pid))
            }
            let cluster = LocalCluster(coordinator: address, coordinatorPID: coordinator.pid, workers: workers)
            group.addTask { try await body(cluster) }
            while let result = try await group.next() {
                if let value = result { return value }
                if options.toleratesWorkerExits { continue }
                throw LaunchError("a cluster process exited while the cluster was in use")
            }
            throw LaunchError("the cluster ended unexpectedly")
        }
    }

    private struct Ready: Sendable {
        var port: Int
        var pid: Int32
    }

    /// Starts one child in `group` and returns once it printed `READY {...}` with its port.
    private static func spawn<T: Sendable>(
        _ options: Options, arguments: [String], name: String, in group: inout ThrowingTaskGroup<T?, any Error>
    ) async throws -> Ready {
        let (readyStream, readyContinuation) = AsyncStream.makeStream(of: Ready.self)
        let platform = {
            var platform = PlatformOptions()
            platform.teardownSequence = [.gracefulShutDown(allowedDurationToNextStep: .seconds(3))]
            return platform
        }()
        let all = arguments + ["--exit-on-stdin-eof"] + options.childArguments
        let tolerated = options.toleratesWorkerExits && name != "coordinator"
        group.addTask {
            defer { readyContinuation.finish() }
            do {
                try await runChild()
            } catch where tolerated && !(error is CancellationError) {
                // A killed worker is the point of the exercise.
            }
            return nil
        }
        @Sendable func runChild() async throws {
            let errorOutput: FileDescriptorOutput = options.inheritStandardError
                ? .fileDescriptor(.standardError, closeAfterSpawningProcess: false)
                : .fileDescriptor(try FileDescriptor.open("/dev/null", .writeOnly), closeAfterSpawningProcess: true)
            _ = try await run(
                .path(options.binary), arguments: Arguments(all), platformOptions: platform, input: .inputWriter,
                output: .sequence, error: errorOutput
            ) { execution in
                // The lifeline: the child reads stdin and exits when it closes, which happens when this
                // process goes away for any reason.
                for try await line in execution.standardOutput.strings() {
                    if let ready = parseReady(line) {
                        readyContinuation.yield(Ready(port: ready, pid: execution.processIdentifier.value))
                    }
                }
            }
        }
        let ready = try await withDeadline(options.readyTimeout, what: "waiting for \(name) to print READY") {
            for await ready in readyStream { return ready }
            throw LaunchError("\(name) exited before it was ready")
        }
        return ready
    }

    /// The port in a line shaped `READY {"role":…,"port":P,…}`.
    static func parseReady(_ line: String) -> Int? {
        guard line.hasPrefix("READY "), let range = line.firstRange(of: "\"port\":") else { return nil }
        let digits = line[range.upperBound...].prefix { $0.isNumber }
        return Int(digits)
    }
}

public struct LaunchError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

import ClusterAdmin
public import ClusterSecurity
public import ClusterTransport
import ClusterWire
import FoundationEssentials
public import Logging
import Subprocess
import Synchronization
public import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A coordinator and N workers as child processes of this one, each started with a lifeline (they exit
/// when their standard input closes, so none outlives this process even if it is killed) and stopped
/// with SIGTERM, then SIGKILL, when the scope ends. Inside the scope a worker or the coordinator can be
/// restarted (fault-injection scenarios): the old process is stopped and a new one started in its place.
public final class LocalCluster: Sendable {
    /// One running process of the cluster.
    public struct Process: Sendable {
        public var nodeID: String
        public var address: NodeAddress
        public var pid: Int32
        /// The address and port of its admin HTTP endpoint (`/metrics`, `/healthz`, `/faults`).
        public var adminHost: String
        public var adminPort: Int
    }

    public let coordinator: NodeAddress
    /// The folder of the cluster's certificates (nil when insecure).
    public let certificates: CertificateDirectory?
    /// The bearer token the processes' admin endpoints take for `PUT` (e.g. `/faults`).
    public let adminToken: String
    private let processes: Mutex<(coordinator: Process, workers: [Process])>
    private let options: Options
    private let restarts: AsyncStream<Restart>.Continuation

    /// The coordinator process now running.
    public var coordinatorProcess: Process { processes.withLock { $0.coordinator } }
    public var coordinatorPID: Int32 { coordinatorProcess.pid }
    /// The workers now running, in node-id order (`worker-1`, …).
    public var workers: [Process] { processes.withLock { $0.workers } }
    /// The hosts the processes run on (`nil`: all on 127.0.0.1).
    public var hosts: RunningHosts? { options.hosts }
    /// Every process started so far, restarted ones included (to check none is left behind).
    public var everyPID: [Int32] { started.withLock { $0 } }
    private let started = Mutex<[Int32]>([])

    private init(
        coordinator: Process,
        workers: [Process],
        certificates: CertificateDirectory?,
        adminToken: String,
        options: Options,
        restarts: AsyncStream<Restart>.Continuation
    ) {
        self.coordinator = coordinator.address
        self.certificates = certificates
        self.adminToken = adminToken
        processes = Mutex((coordinator, workers))
        self.options = options
        self.restarts = restarts
        started.withLock { $0 = [coordinator.pid] + workers.map(\.pid) }
    }

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
        /// When set, each child's stderr is appended to `DIRECTORY/NAME.log` instead (a restarted
        /// process continues its predecessor's file): evidence to read when a run fails.
        public var standardErrorDirectory: FilePath?
        public var readyTimeout: Duration
        /// Whether a worker process may exit while the cluster is in use (fault injection kills them);
        /// otherwise any exit ends the scope with an error.
        public var toleratesWorkerExits = false
        /// How the processes authenticate each other (default: mutual TLS with a throw-away CA).
        public var security = Security.throwawayCA
        /// The hosts to run on, made beforehand (``HostNetwork/withHosts(_:binary:logger:_:)``): each
        /// process on its host's address in its host's namespace. `nil`: every process on 127.0.0.1.
        public var hosts: RunningHosts?

        /// The address node `nodeID` listens on.
        func address(of nodeID: String) -> String {
            hosts.map { $0.topology.address($0.topology.host(of: nodeID)) } ?? "127.0.0.1"
        }

        public init(
            binary: FilePath,
            workers: Int,
            childArguments: [String] = [],
            inheritStandardError: Bool = true,
            readyTimeout: Duration = .seconds(60)
        ) {
            self.binary = binary
            self.workers = workers
            self.childArguments = childArguments
            self.inheritStandardError = inheritStandardError
            self.readyTimeout = readyTimeout
        }
    }

    /// How a local cluster's processes are secured.
    public enum Security: Sendable {
        /// A CA made for this cluster in a temporary folder, deleted when the cluster stops.
        case throwawayCA
        /// The certificates in a folder; missing ones are issued there when it holds the CA key.
        case certificates(CertificateDirectory)
        /// Plaintext: every child runs with `--insecure` and says so.
        case insecure
    }

    /// Credentials for a client of this cluster acting as `name` for `tenant` (issued by the cluster's
    /// CA when the folder has none), or `.insecure` for an insecure cluster.
    public func clientSecurity(name: String, tenant: String) throws(CertificateError) -> TransportSecurity {
        guard let certificates else { return .insecure }
        return .mutualTLS(
            try certificates.credentials(for: CertifiedIdentity(role: .client, nodeID: name, tenant: tenant))
        )
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
        _ options: Options,
        logger: Logger,
        _ body: @escaping @Sendable (LocalCluster) async throws -> T
    ) async throws -> T {
        // A folder of the cluster's own for its admin token and, unless given, its throw-away CA.
        let scratch = try makeTemporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: scratch.path) }
        let adminToken = AdminToken.random()
        let tokenFile = "\(scratch.path)/admin-token"
        guard
            FileManager.default.createFile(
                atPath: tokenFile,
                contents: Data(adminToken.utf8),
                attributes: [.posixPermissions: 0o600]
            )
        else { throw LaunchError("cannot write \(tokenFile)") }
        var options = options
        options.childArguments += ["--admin-token-file", tokenFile]
        if case .throwawayCA = options.security {
            try CertificateAuthority.create().write(to: scratch)
            options.security = .certificates(scratch)
        }
        let certificates: CertificateDirectory?
        switch options.security {
        case .throwawayCA:
            preconditionFailure("the throw-away CA was made above")
        case .certificates(let folder):
            certificates = folder
            _ = try folder.credentials(for: CertifiedIdentity(role: .coordinator, nodeID: "coordinator"))
            for index in 0..<options.workers {
                _ = try folder.credentials(for: CertifiedIdentity(role: .worker, nodeID: "worker-\(index + 1)"))
            }
            options.childArguments += ["--certs", folder.path]
        case .insecure:
            certificates = nil
            options.childArguments += ["--insecure"]
        }
        return try await withThrowingTaskGroup(of: T?.self) { [options] group in
            defer { group.cancelAll() }
            let coordinatorReady = try await spawn(
                options,
                arguments: coordinatorArguments(options, port: 0) + ["--new-cluster"],
                name: "coordinator",
                logger: logger,
                in: &group
            )
            let address = NodeAddress(host: options.address(of: "coordinator"), port: coordinatorReady.port)
            let coordinator = Process(
                nodeID: "coordinator",
                address: address,
                pid: coordinatorReady.pid,
                adminHost: address.host,
                adminPort: coordinatorReady.adminPort
            )
            var workers: [Process] = []
            for index in 0..<options.workers {
                let nodeID = "worker-\(index + 1)"
                let ready = try await spawn(
                    options,
                    arguments: workerArguments(options, nodeID: nodeID, coordinator: address),
                    name: nodeID,
                    logger: logger,
                    in: &group
                )
                workers.append(
                    Process(
                        nodeID: nodeID,
                        address: NodeAddress(host: options.address(of: nodeID), port: ready.port),
                        pid: ready.pid,
                        adminHost: options.address(of: nodeID),
                        adminPort: ready.adminPort
                    )
                )
            }
            let (requests, continuation) = AsyncStream.makeStream(of: Restart.self)
            let cluster = LocalCluster(
                coordinator: coordinator,
                workers: workers,
                certificates: certificates,
                adminToken: adminToken,
                options: options,
                restarts: continuation
            )
            // Restarted processes run in a group of their own, owned by this child task.
            group.addTask {
                await withThrowingTaskGroup(of: Void?.self) { restarted in
                    for await request in requests {
                        do {
                            request.done.resume(
                                returning: try await spawn(
                                    options,
                                    arguments: request.arguments,
                                    name: request.name,
                                    logger: logger,
                                    in: &restarted
                                )
                            )
                        } catch {
                            request.done.resume(throwing: error)
                        }
                    }
                    restarted.cancelAll()
                }
                return nil
            }
            group.addTask { try await body(cluster) }
            while let result = try await group.next() {
                if let value = result { return value }
                if options.toleratesWorkerExits { continue }
                // Cancelled (SIGTERM to `cluster up`), children stop before the body notices: not a failure.
                try Task.checkCancellation()
                throw LaunchError("a cluster process exited while the cluster was in use")
            }
            throw LaunchError("the cluster ended unexpectedly")
        }
    }

    private static func coordinatorArguments(_ options: Options, port: Int) -> [String] {
        let host = options.address(of: "coordinator")
        return ["coordinator", "--listen", "\(host):\(port)", "--admin-host", host] + options.coordinatorArguments
    }

    private static func workerArguments(_ options: Options, nodeID: String, coordinator: NodeAddress) -> [String] {
        let host = options.address(of: nodeID)
        return ["worker", "--coordinator", coordinator.description, "--listen", "\(host):0", "--admin-host", host]
            + ["--node-id", nodeID] + options.workerArguments
    }

    /// Stops worker `nodeID` (SIGTERM when `graceful`, else SIGKILL; then waits until it is gone) and
    /// starts a new process with the same node id, which registers as a new incarnation. Returns it.
    public func restartWorker(_ nodeID: String, graceful: Bool = true) async throws -> Process {
        guard let old = processes.withLock({ $0.workers.first { $0.nodeID == nodeID } }) else {
            throw LaunchError("the cluster has no \(nodeID)")
        }
        try await Self.stop(old.pid, signal: graceful ? SIGTERM : SIGKILL, name: nodeID)
        let ready = try await spawnAgain(
            Self.workerArguments(options, nodeID: nodeID, coordinator: coordinator),
            name: nodeID
        )
        let new = Process(
            nodeID: nodeID,
            address: NodeAddress(host: options.address(of: nodeID), port: ready.port),
            pid: ready.pid,
            adminHost: options.address(of: nodeID),
            adminPort: ready.adminPort
        )
        processes.withLock { state in
            state.workers = state.workers.map { $0.nodeID == nodeID ? new : $0 }
        }
        return new
    }

    /// Stops the coordinator (SIGTERM when `graceful`, else SIGKILL; then waits until it is gone) and
    /// starts a new one on the same port, which rebuilds its state from the workers' re-registrations.
    /// Returns the new process.
    public func restartCoordinator(graceful: Bool = false) async throws -> Process {
        let old = coordinatorProcess
        try await Self.stop(old.pid, signal: graceful ? SIGTERM : SIGKILL, name: "coordinator")
        let ready = try await spawnAgain(
            Self.coordinatorArguments(options, port: coordinator.port),
            name: "coordinator"
        )
        let new = Process(
            nodeID: "coordinator",
            address: coordinator,
            pid: ready.pid,
            adminHost: coordinator.host,
            adminPort: ready.adminPort
        )
        processes.withLock { $0.coordinator = new }
        return new
    }

    private func spawnAgain(_ arguments: [String], name: String) async throws -> Ready {
        let ready = try await withCheckedThrowingContinuation { continuation in
            restarts.yield(Restart(arguments: arguments, name: name, done: continuation))
        }
        started.withLock { $0.append(ready.pid) }
        return ready
    }

    /// Sends `signal` and waits (up to 10 s) until the process is gone (reaped by its runner).
    private static func stop(_ pid: Int32, signal: Int32, name: String) async throws {
        _ = kill(pid, signal)
        let deadline = ContinuousClock.now + .seconds(10)
        while kill(pid, 0) == 0 {
            guard ContinuousClock.now < deadline else {
                throw LaunchError("\(name) (pid \(pid)) did not exit within 10 s")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    private struct Restart: Sendable {
        var arguments: [String]
        var name: String
        var done: CheckedContinuation<Ready, any Error>
    }

    private struct Ready: Sendable {
        var port: Int
        var pid: Int32
        var adminPort: Int
    }

    /// Starts one child in `group` and returns once it printed `READY {...}` with its port.
    private static func spawn<R: Sendable>(
        _ options: Options,
        arguments: [String],
        name: String,
        logger: Logger,
        in group: inout ThrowingTaskGroup<R?, any Error>
    ) async throws -> Ready {
        let (readyStream, readyContinuation) = AsyncStream.makeStream(of: Ready.self)
        let platform = {
            var platform = PlatformOptions()
            platform.teardownSequence = [.gracefulShutDown(allowedDurationToNextStep: .seconds(3))]
            return platform
        }()
        let all = arguments + ["--exit-on-stdin-eof"] + options.childArguments
        let tolerated = options.toleratesWorkerExits
        group.addTask {
            defer { readyContinuation.finish() }
            do {
                let status = try await runChild()
                // Cancelled, the cluster is stopping: every child exits, and that is no news.
                if tolerated && !Task.isCancelled {
                    logger.warning("\(name) exited (\(status)); the rest of the cluster keeps running")
                }
            } catch  where tolerated && !(error is CancellationError) {
                // A killed process is the point of the exercise.
                if !Task.isCancelled {
                    logger.warning("\(name) ended: \(error); the rest of the cluster keeps running")
                }
            }
            return nil
        }
        @Sendable func runChild() async throws -> TerminationStatus {
            let errorOutput: FileDescriptorOutput =
                if let directory = options.standardErrorDirectory {
                    .fileDescriptor(
                        try FileDescriptor.open(
                            directory.appending("\(name).log"),
                            .writeOnly,
                            options: [.create, .append],
                            permissions: .ownerReadWrite
                        ),
                        closeAfterSpawningProcess: true
                    )
                } else if options.inheritStandardError {
                    .fileDescriptor(.standardError, closeAfterSpawningProcess: false)
                } else {
                    .fileDescriptor(try FileDescriptor.open("/dev/null", .writeOnly), closeAfterSpawningProcess: true)
                }
            // On a host, `ip netns exec` enters its namespace and execs the binary (same pid).
            let command = options.hosts.map { hosts in
                ["netns", "exec", hosts.topology.namespace(hosts.topology.host(of: name)), options.binary.string]
            }
            return try await run(
                command == nil ? .path(options.binary) : .name("ip"),
                arguments: Arguments((command ?? []) + all),
                platformOptions: platform,
                input: .inputWriter,
                output: .sequence,
                error: errorOutput
            ) { execution in
                // The lifeline: the child reads stdin and exits when it closes, which happens when this
                // process goes away for any reason.
                for try await line in execution.standardOutput.strings() {
                    if let port = readyField(line, "port") {
                        readyContinuation.yield(
                            Ready(
                                port: port,
                                pid: execution.processIdentifier.value,
                                adminPort: readyField(line, "adminPort") ?? 0
                            )
                        )
                    }
                }
            }.terminationStatus
        }
        let ready = try await withDeadline(options.readyTimeout, what: "waiting for \(name) to print READY") {
            for await ready in readyStream { return ready }
            throw LaunchError("\(name) exited before it was ready")
        }
        return ready
    }

    /// A new folder only this user can read, for a throw-away CA.
    private static func makeTemporaryFolder() throws -> CertificateDirectory {
        var template = Array("/tmp/tessera-certs-XXXXXX".utf8CString)
        guard let path = mkdtemp(&template) else {
            throw LaunchError("cannot create a temporary folder for certificates")
        }
        return CertificateDirectory(String(cString: path))
    }

    /// The number in field `name` of a line shaped `READY {"role":…,"port":P,…}`.
    static func readyField(_ line: String, _ name: String) -> Int? {
        guard line.hasPrefix("READY "), let range = line.firstRange(of: "\"\(name)\":") else { return nil }
        let digits = line[range.upperBound...].prefix { $0.isNumber }
        return Int(digits)
    }
}

public struct LaunchError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

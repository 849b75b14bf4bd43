import ArgumentParser
import ClusterAdmin
import ClusterLauncher
import ClusterSecurity
import ClusterTransport
import Logging
import ServiceLifecycle

struct ClusterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Manage a local multi-process cluster.",
        subcommands: [Up.self, CleanHosts.self]
    )

    struct Up: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Start a coordinator and N workers as child processes; stop them all on exit.",
            discussion: """
                Prints one line `READY {"coordinator":"127.0.0.1:PORT","certs":"DIR","workers":[...]}` on \
                stdout once every worker has registered, then runs until SIGINT or SIGTERM and stops every \
                child. Children also watch a lifeline (their stdin), so none outlives this process even if \
                it is killed. A child that exits meanwhile (a worker killed to test a failover: the pids are \
                on the READY line) is logged, and the rest of the cluster keeps running.

                Connections are mutual TLS. Without --certs the cluster gets a throw-away CA in a temporary \
                folder (deleted at exit) with a client certificate `client` of tenant `default`, so \
                `tessera status --coordinator ADDR --certs DIR` works while it runs. With --certs DIR, the \
                CA there is used (created if the folder has none) and missing certificates are issued.
                """
        )

        @Option(help: "Cluster configuration file (YAML); see cluster/local.yaml.")
        var config: String?

        @Option(help: "Number of worker processes (default: the configuration's, else 3).")
        var workers: Int?

        @Option(
            help: ArgumentHelp(
                "A certificate folder to use (created with a new CA if it has none) instead of a throw-away CA.",
                valueName: "dir"
            )
        )
        var certs: String?

        @Flag(help: "Plaintext connections: any peer can claim any role, node id or tenant.")
        var insecure = false

        @OptionGroup(title: "Hosts") var hosts: HostOptions

        @OptionGroup var process: ProcessOptions

        func run() async throws {
            var settings = ClusterConfiguration.defaults
            if let config {
                do { settings = try ClusterConfiguration.load(path: config) } catch {
                    throw usageFailure("\(error)")
                }
            }
            let count = workers ?? settings.cluster.workers
            guard (1...64).contains(count) else { throw usageFailure("--workers must be in 1...64, got \(count)") }
            let logger = try process.bootstrapLogging()
            var options = LocalCluster.Options(
                binary: LocalCluster.currentBinary,
                workers: count,
                childArguments: ["--log-level", process.logLevel] + process.tracing.childArguments,
                readyTimeout: .seconds(settings.cluster.readyTimeoutSeconds)
            )
            // A process killed to test a fault is logged; the rest of the cluster keeps serving.
            options.toleratesWorkerExits = true
            options.coordinatorArguments = CoordinatorCommand.arguments(settings.coordinator)
            options.workerArguments = [
                "--storage", settings.worker.storage.rawValue, "--faults", settings.worker.faults,
            ]
            switch (certs, insecure) {
            case (_?, true):
                throw usageFailure("give --certs or --insecure, not both")
            case (let path?, false):
                let folder = CertificateDirectory(path)
                if !folder.hasAuthority {
                    do { try CertificateAuthority.create().write(to: folder) } catch {
                        throw usageFailure(error.message)
                    }
                }
                options.security = .certificates(folder)
            case (nil, true):
                Terminal.warnInsecure()
                options.security = .insecure
            case (nil, false):
                options.security = .throwawayCA
            }
            let topology = try await hosts.topology(settings.network)
            let configured = options
            @Sendable func serve(on running: RunningHosts?) async throws {
                var options = configured
                options.hosts = running
                let launch = options
                try await runServices(
                    [
                        ClosureService {
                            try await LocalCluster.withCluster(launch, logger: logger) { cluster in
                                _ = try cluster.clientSecurity(name: "client", tenant: "default")
                                let workerList = cluster.workers.map { worker in
                                    "{\"id\":\(jsonString(worker.nodeID)),\"address\":\(jsonString(worker.address.description)),"
                                        + "\"pid\":\(worker.pid),\"adminPort\":\(worker.adminPort)}"
                                }.joined(separator: ",")
                                let network = topology.map {
                                    ",\"hosts\":{\"name\":\(jsonString($0.name)),\"subnet\":\(jsonString($0.subnet.description)),"
                                        + "\"bridge\":\(jsonString($0.bridgeAddress))}"
                                }
                                Terminal.output(
                                    "READY {\"coordinator\":\(jsonString(cluster.coordinator.description)),"
                                        + "\"certs\":\(cluster.certificates.map { jsonString($0.path) } ?? "null"),"
                                        + "\"coordinatorPid\":\(cluster.coordinatorPID),"
                                        + "\"coordinatorAdminPort\":\(cluster.coordinatorProcess.adminPort),\"workers\":[\(workerList)]"
                                        + "\(network ?? "")}\n"
                                )
                                // Held until SIGINT/SIGTERM (or the lifeline) cancels the scope.
                                while true { try await Task.sleep(for: .seconds(3600)) }
                            }
                        }
                    ],
                    options: process,
                    logger: logger
                )
            }
            try await hosts.run(on: topology, logger: logger, serve)
        }
    }

    struct CleanHosts: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "clean-hosts",
            abstract: "Remove the network namespaces and links a `cluster up --hosts` left behind.",
            discussion: """
                Without --name, removes those of every launcher no longer running (names `ts<pid>...`). \
                `cluster up --hosts` removes its own at exit, and a guard process removes them if it is \
                killed, so this is for what a crash of both left behind.
                """
        )

        @Option(help: "Remove the topology with this name (`ts<pid>`), its launcher running or not.")
        var name: String?

        @Flag(help: .hidden)
        var afterStdinCloses = false

        func run() async throws {
            guard geteuid() == 0 else { throw usageFailure("removing network namespaces needs root") }
            let logger = Logger(label: "tessera.hosts")
            if afterStdinCloses {
                // The guard of a running launcher: waits for it to go, however it goes.
                var byte: UInt8 = 0
                while read(0, &byte, 1) > 0 {}
            }
            let names = if let name { [name] } else { try await HostNetwork.orphans() }
            for name in names { await HostNetwork.remove(named: name, logger: logger) }
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif

import ArgumentParser
import ClusterAdmin
import ClusterLauncher
import ClusterTransport
import Logging
import ServiceLifecycle

struct ClusterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Manage a local multi-process cluster.",
        subcommands: [Up.self]
    )

    struct Up: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Start a coordinator and N workers as child processes; stop them all on exit.",
            discussion: """
                Prints one line `READY {"coordinator":"127.0.0.1:PORT","workers":[...]}` on stdout once every \
                worker has registered, then runs until SIGINT or SIGTERM and stops every child. Children \
                also watch a lifeline (their stdin), so none outlives this process even if it is killed.
                """
        )

        @Option(help: "Cluster configuration file (YAML); see cluster/local.yaml.")
        var config: String?

        @Option(help: "Number of worker processes (default: the configuration's, else 3).")
        var workers: Int?

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
                binary: LocalCluster.currentBinary, workers: count, childArguments: ["--log-level", process.logLevel],
                readyTimeout: .seconds(settings.cluster.readyTimeoutSeconds))
            options.coordinatorArguments = CoordinatorCommand.arguments(settings.coordinator)
            options.workerArguments = ["--storage", settings.worker.storage.rawValue, "--faults", settings.worker.faults]
            let launch = options
            try await runServices(
                [ClosureService {
                    try await LocalCluster.withCluster(launch, logger: logger) { cluster in
                        let workerList = cluster.workers.map { worker in
                            "{\"id\":\(jsonString(worker.nodeID)),\"address\":\(jsonString(worker.address.description)),"
                                + "\"pid\":\(worker.pid),\"adminPort\":\(worker.adminPort)}"
                        }.joined(separator: ",")
                        Terminal.output(
                            "READY {\"coordinator\":\(jsonString(cluster.coordinator.description)),"
                                + "\"coordinatorPid\":\(cluster.coordinatorPID),"
                                + "\"coordinatorAdminPort\":\(cluster.coordinatorProcess.adminPort),\"workers\":[\(workerList)]}\n")
                        // Held until SIGINT/SIGTERM (or the lifeline) cancels the scope.
                        while true { try await Task.sleep(for: .seconds(3600)) }
                    }
                }], options: process, logger: logger)
        }
    }
}

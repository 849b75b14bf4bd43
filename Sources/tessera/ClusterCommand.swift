import ArgumentParser
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
                Prints one line `READY {"coordinator":"127.0.0.1:PORT","workers":[...]}` on stdout once every
                worker has registered, then runs until SIGINT or SIGTERM and stops every child. Children
                also watch a lifeline (their stdin), so none outlives this process even if it is killed.
                """
        )

        @Option(help: "Number of worker processes.")
        var workers = 3

        @OptionGroup var process: ProcessOptions

        func run() async throws {
            guard (1...64).contains(workers) else { throw usageFailure("--workers must be in 1...64, got \(workers)") }
            let logger = try process.bootstrapLogging()
            let options = LocalCluster.Options(
                binary: LocalCluster.currentBinary, workers: workers, childArguments: ["--log-level", process.logLevel])
            try await runServices(
                [ClosureService {
                    try await LocalCluster.withCluster(options, logger: logger) { cluster in
                        let workerList = cluster.workers.map { worker in
                            "{\"id\":\(jsonString(worker.nodeID)),\"address\":\(jsonString(worker.address.description)),"
                                + "\"pid\":\(worker.pid)}"
                        }.joined(separator: ",")
                        Terminal.output(
                            "READY {\"coordinator\":\(jsonString(cluster.coordinator.description)),"
                                + "\"coordinatorPid\":\(cluster.coordinatorPID),\"workers\":[\(workerList)]}\n")
                        // Held until SIGINT/SIGTERM (or the lifeline) cancels the scope.
                        while true { try await Task.sleep(for: .seconds(3600)) }
                    }
                }], options: process, logger: logger)
        }
    }
}

import ArgumentParser
import Client
import ClusterSecurity
import ClusterTransport
import ClusterWire
import FoundationEssentials
import Logging

struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the cluster's members, their shards, live sequences and accounted KV bytes.",
        discussion: """
            With --json prints {"workers":[{"id","address","state","primaryShards","replicaShards","kvBytes",...}],\
            "sequences":N,...} where state is alive, suspect or dead, and a worker's shards are those of open \
            sequences it holds as the primary or as a replica. With --sequences, also the open sequences of \
            this client's tenant (the one its certificate names): id, state (prefilling until every copy applied \
            its budget, then decoding), policy and retention, head rows % (once compressed, the smallest and \
            the largest share of the prompt's rows one KV head keeps), prompt length, accounted bytes per copy, \
            epoch and shards; in JSON as "openSequences".
            """
    )

    @Option(help: "The coordinator's address, host:port.")
    var coordinator = "127.0.0.1:7400"

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    @Flag(help: "Also list this tenant's open sequences.")
    var sequences = false

    @OptionGroup var security: ClientSecurityOptions

    func run() async throws {
        let address: NodeAddress
        do { address = try NodeAddress(parsing: coordinator) } catch { throw usageFailure(error.message) }
        let status: ClusterStatus
        let logger = Logger(label: "tessera", factory: { _ in SwiftLogNoOpLogHandler() })
        let transport = try security.security()
        do {
            status = try await TesseraClient.withClient(
                coordinator: address,
                security: transport,
                nodeID: "status-\(processID)",
                logger: logger
            ) { client in try await client.status(includeSequences: sequences) }
        } catch {
            Terminal.error("error: cannot read the status of \(address): \(error)\n")
            throw ExitCode(1)
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            let data = try encoder.encode(status)
            Terminal.output(String(decoding: data, as: UTF8.self) + "\n")
            return
        }
        Terminal.output(
            "\(status.workers.count) workers, \(status.sequences) sequences, "
                + "\(ResultTable.bytes(Int(status.totalKVBytes))) KV held, "
                + "\(ResultTable.bytes(Int(status.accountedKVBytes))) accounted"
                + (status.memoryLimitBytes > 0 ? " of a \(ResultTable.bytes(Int(status.memoryLimitBytes))) limit" : "")
                + (status.underReplicatedShards > 0
                    ? ", \(status.underReplicatedShards) shards under-replicated\n" : "\n")
        )
        let header = ["id", "address", "state", "primaries", "replicas", "kv bytes", "text", "image", "video"]
        let rows = status.workers.map { w in
            [
                w.id, w.address, w.state, "\(w.primaryShards)", "\(w.replicaShards)",
                ResultTable.bytes(Int(w.kvBytes)),
                ResultTable.bytes(Int(w.kvBytesByModality["text"] ?? 0)),
                ResultTable.bytes(Int(w.kvBytesByModality["image"] ?? 0)),
                ResultTable.bytes(Int(w.kvBytesByModality["video"] ?? 0)),
            ]
        }
        Self.printTable(header, rows)
        guard let open = status.openSequences else { return }
        Terminal.output("\n\(open.count) open sequences of this tenant\n")
        Self.printTable(
            ["sequence", "state", "policy", "retention", "head rows %", "prompt", "kv bytes", "epoch", "shards"],
            open.map { s in
                [
                    "\(s.id)", s.state, s.policy, ResultTable.format(s.retention, 3),
                    s.headRowShares.map(ResultTable.percentages) ?? "-", "\(s.promptLength)",
                    ResultTable.bytes(Int(s.kvBytes)), "\(s.epoch)", "\(s.shards)",
                ]
            }
        )
    }

    private static func printTable(_ header: [String], _ rows: [[String]]) {
        let widths = header.indices.map { c in ([header[c]] + rows.map { $0[c] }).map(\.count).max()! }
        for row in [header] + rows {
            Terminal.output(
                row.enumerated().map { $0.element.padding(widths[$0.offset]) }.joined(separator: "  ") + "\n"
            )
        }
    }
}

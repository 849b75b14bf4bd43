import ArgumentParser
import ClusterAdmin
import ClusterLauncher
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// `--hosts N` and `--network SPEC`: run a local cluster on N hosts of this machine (network
/// namespaces on a bridge) with shaped links, instead of on 127.0.0.1.
struct HostOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "Run on N hosts of this machine (Linux, root): each a network namespace with its own address on a "
                + "bridge; the coordinator on host 1, workers on the others in turn. Removed at exit, even after "
                + "a SIGKILL (`tessera cluster clean-hosts` removes what a crash left).",
            valueName: "n"
        )
    )
    var hosts: Int?

    @Option(
        help: ArgumentHelp(
            "With --hosts: what every link does, e.g. 'delay=2ms,jitter=1ms,loss=0.1%,rate=10gbit,seed=7' "
                + "(keys: subnet, delay, jitter, loss, rate, seed; over a configuration's network section).",
            valueName: "spec"
        )
    )
    var network: String?

    /// The hosts asked for, checked before anything is made; nil without `--hosts`.
    func topology(_ configured: NetworkSettings = .defaults, adjustable: Bool = false) async throws -> HostTopology? {
        guard let hosts else {
            if network != nil { throw usageFailure("--network shapes the links between hosts; give --hosts too") }
            return nil
        }
        guard HostTopology.hostsRange.contains(hosts) else {
            throw usageFailure("--hosts must be in \(HostTopology.hostsRange), got \(hosts)")
        }
        let settings: NetworkSettings
        let link: LinkProfile
        var subnet: IPv4Subnet?
        do {
            settings = try network.map { try configured.merging($0) } ?? configured
            link = try settings.link()
            subnet = try settings.subnetRange()
        } catch {
            throw usageFailure("\(error)")
        }
        guard geteuid() == 0 else {
            throw usageFailure(
                "--hosts makes network namespaces, veth links and a bridge, which needs root; run as root, "
                    + "or leave --hosts out to run every process on 127.0.0.1"
            )
        }
        if subnet == nil {
            do { subnet = try await HostNetwork.freeSubnet(seed: Int(getpid())) } catch {
                throw usageFailure("\(error)")
            }
        }
        return HostTopology(
            name: "ts\(getpid())",
            subnet: subnet!,
            hosts: hosts,
            link: link,
            seed: settings.seed ?? .random(in: 1...UInt64.max),
            adjustable: adjustable
        )
    }

    /// Runs `body` on `topology`'s hosts (made before, removed after), or as is without them.
    func run<T: Sendable>(
        on topology: HostTopology?,
        logger: Logger,
        _ body: @Sendable (RunningHosts?) async throws -> T
    ) async throws -> T {
        guard let topology else { return try await body(nil) }
        do {
            return try await HostNetwork.withHosts(topology, binary: LocalCluster.currentBinary, logger: logger, body)
        } catch let error as HostSetupError {
            throw usageFailure("cannot make the hosts: \(error)")
        }
    }
}

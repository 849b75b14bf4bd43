import ClusterAdmin
import ClusterLauncher
import FoundationEssentials
import Subprocess
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite struct HostTopologyTests {
    let topology = HostTopology(
        name: "ts4242",
        subnet: IPv4Subnet("10.213.7.0/24")!,
        hosts: 3,
        link: LinkProfile(delayMicroseconds: 2_000, jitterMicroseconds: 1_000, rateBitsPerSecond: 1_000_000_000)
    )

    @Test func everyNameStartsWithTheTopologysName() {
        let created = topology.creation.flatMap { $0 }.filter { $0.hasPrefix("ts") }
        #expect(!created.isEmpty)
        #expect(created.allSatisfy { $0.hasPrefix("ts4242") && $0.utf8.count <= 15 }, "\(created)")
        #expect(topology.namespace(2) == "ts4242-h2")
        #expect(topology.bridgeAddress == "10.213.7.1")
        #expect(topology.address(3) == "10.213.7.4")
    }

    @Test func theCoordinatorHasHostOneAndWorkersTakeTheOthersInTurn() {
        #expect(topology.host(of: "coordinator") == 1)
        #expect((1...5).map { topology.host(of: "worker-\($0)") } == [2, 3, 2, 3, 2])
        let alone = HostTopology(name: "ts1", subnet: topology.subnet, hosts: 1, link: LinkProfile())
        #expect(alone.host(of: "worker-3") == 1)
    }

    @Test func everySendingSideIsShapedOnce() {
        let netem = topology.shaping(netem: true)
        #expect(netem.count == 4)
        #expect(
            netem[0] == [
                "tc", "qdisc", "add", "dev", "ts4242-br", "root", "netem", "delay", "2000us", "1000us", "rate",
                "1000000000bit",
            ]
        )
        #expect(netem[3].prefix(3) == ["tc", "-n", "ts4242-h3"])
        // Without netem the rate is tbf's; delay and jitter are the shaper's.
        let tbf = topology.shaping(netem: false)
        #expect(tbf.count == 4 && tbf.allSatisfy { $0.contains("tbf") && $0.contains("1000000000bit") })
        #expect(
            HostTopology(name: "ts1", subnet: topology.subnet, hosts: 2, link: LinkProfile()).shaping(netem: true)
                .isEmpty
        )
    }
}

/// `cluster up --hosts` and `chaos --hosts` as a user runs them: root only (they make namespaces),
/// with `ip` and `iptables` (which shapes the links on kernels without netem) installed.
@Suite(
    .enabled(if: geteuid() == 0, "network namespaces need root"),
    .enabled(if: onPath("ip") && onPath("iptables"), "needs iproute2 and iptables"),
    .serialized
)
struct HostsCommandTests {
    /// Hosts on a real bridge: the processes listen on their hosts' addresses, the links carry the
    /// configured delay (a TCP handshake from here crosses two shaped links), a short load test runs
    /// across them, an overlapping range is refused, and a SIGKILL of the launcher leaves no
    /// namespace, interface or rule behind.
    @Test(.timeLimit(.minutes(3)))
    func clusterUpOnHostsIsShapedAndRemovedAfterASIGKILL() async throws {
        let before = try await HostNetwork.namespaces(named: "ts")
        let result = try await run(
            .path(LocalCluster.siblingBinary),
            arguments: ["cluster", "up", "--workers", "3", "--hosts", "4", "--network", "delay=20ms,seed=5"],
            input: .none,
            output: .sequence,
            error: .discarded
        ) { execution -> String? in
            var ready: String?
            for try await line in execution.standardOutput.strings() where line.hasPrefix("READY ") {
                ready = line
                break
            }
            guard let ready else { return nil }
            let hosts = try #require(ready.firstMatch(of: /"name":"(ts\d+)","subnet":"([0-9.\/]+)"/))
            let name = String(hosts.1)
            let subnet = try #require(IPv4Subnet(String(hosts.2)))
            let coordinator = try #require(ready.firstMatch(of: /"coordinator":"([0-9.]+):(\d+)"/))
            let address = try #require(IPv4Subnet("\(coordinator.1)/32"))
            #expect(subnet.overlaps(address) && coordinator.1 != "127.0.0.1", "\(ready)")
            #expect(try await HostNetwork.namespaces(named: name).count == 4)

            let handshake = try connectTime(to: String(coordinator.1), port: Int(coordinator.2)!)
            #expect(handshake >= .milliseconds(35), "a TCP handshake across two 20 ms links took \(handshake)")

            let certificates = try #require(ready.firstMatch(of: /"certs":"([^"]+)"/))
            let bench = try await runTessera([
                "bench", "--coordinator", "\(coordinator.1):\(coordinator.2)", "--certs", String(certificates.1),
                "--model", "tiny", "--sequences", "4", "--decode-tokens", "8",
            ])
            #expect(bench.status == .exited(0), "\(bench.stderr)")
            // The row: policy, budget, sequences, …, errors, refusals.
            let row = try #require(bench.stdout.split(separator: "\n").first { $0.hasPrefix("vl-cache ") })
            let fields = row.split(separator: " ")
            #expect(fields[2] == "4" && fields[fields.count - 2] == "0", "\(bench.stdout)")

            let clash = try await runTessera(["cluster", "up", "--hosts", "1", "--network", "subnet=\(subnet)"])
            #expect(clash.status == .exited(64), "\(clash.stderr)")
            #expect(clash.stderr.contains("overlaps \(subnet)"), "\(clash.stderr)")

            kill(execution.processIdentifier.value, SIGKILL)
            return name
        }
        let name = try #require(result.closureResult, "no READY line")
        let left = try await untilEmpty(within: .seconds(15)) {
            let namespaces = try await HostNetwork.namespaces(named: name)
            let interfaces = try await HostNetwork.interfaces(named: name)
            let rules = try await iptablesRules().filter { $0.contains(name) }
            return namespaces + interfaces + rules
        }
        #expect(left.isEmpty, "left behind: \(left)")
        #expect(try await HostNetwork.namespaces(named: "ts") == before, "the refused launch left something")
    }

    /// The partition-worker scenario with the partition made by the kernel: the primary's host link
    /// goes down, the coordinator fails it over, the link comes back and the worker rejoins.
    @Test(.timeLimit(.minutes(3)))
    func chaosPartitionsAHostByItsLink() async throws {
        let result = try await runTessera([
            "chaos", "--scenario", "cluster/scenarios/partition-worker.yaml", "--hosts", "4", "--network",
            "delay=2ms,jitter=1ms,loss=0.1%,rate=10gbit,seed=7",
        ])
        #expect(result.status == .exited(0), "\(result.stdout)\n\(result.stderr)")
        #expect(result.stdout.contains("result               PASSED"), "\(result.stdout)")
        #expect(result.stderr.contains("hosts made"), "\(result.stderr)")
    }

    /// A latency spike and a loss burst on the primary's host link, then its link restored: nothing
    /// fails over and every output stays bit-identical.
    @Test(.timeLimit(.minutes(3)))
    func chaosDegradesAHostsLinkAndRestoresIt() async throws {
        let result = try await runTessera([
            "chaos", "--scenario", "cluster/scenarios/degrade-primary.yaml", "--hosts", "4", "--network",
            "delay=2ms,jitter=1ms,seed=3",
        ])
        #expect(result.status == .exited(0), "\(result.stdout)\n\(result.stderr)")
        #expect(
            result.stdout.contains("degrade worker-") && result.stdout.contains("restore worker-"),
            "\(result.stdout)"
        )
        #expect(result.stdout.contains("result               PASSED"), "\(result.stdout)")
    }
}

/// How long a TCP handshake with `host:port` takes from this namespace.
private func connectTime(to host: String, port: Int) throws -> Duration {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    #expect(fd >= 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = UInt16(port).bigEndian
    inet_pton(AF_INET, host, &address.sin_addr)
    let start = ContinuousClock.now
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    }
    try #require(connected == 0, "connect to \(host):\(port) failed: errno \(errno)")
    return ContinuousClock.now - start
}

private func iptablesRules() async throws -> [String] {
    let result = try await run(
        .name("iptables"),
        arguments: ["-w", "-t", "mangle", "-S"],
        output: .string(limit: 1 << 20),
        error: .discarded
    )
    return result.standardOutput.split(separator: "\n").map(String.init)
}

/// Polls `value` until it is empty or `limit` has passed; returns the last value.
private func untilEmpty<T: Collection>(within limit: Duration, _ value: () async throws -> T) async throws -> T {
    let deadline = ContinuousClock.now + limit
    while true {
        let current = try await value()
        if current.isEmpty || ContinuousClock.now >= deadline { return current }
        try await Task.sleep(for: .milliseconds(100))
    }
}

private func onPath(_ command: String) -> Bool {
    let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/sbin:/usr/bin:/sbin:/bin"
    return path.split(separator: ":").contains { access("\($0)/\(command)", X_OK) == 0 }
}

public import ClusterAdmin
import FoundationEssentials
public import Logging
import Subprocess
public import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Several hosts on one machine (Linux, root): each host a network namespace with one veth link to a
/// bridge in this namespace, addressed from a private range, every link shaped by one ``LinkProfile``.
/// The value only plans names, addresses and commands; ``HostNetwork`` carries them out.
///
/// Every name starts with ``name`` (`ts` and the launcher's pid), so what one launcher made is found
/// and removed by name alone, even after that launcher was killed.
public struct HostTopology: Sendable, Equatable {
    /// The prefix of every namespace and interface made: `ts<pid>`.
    public let name: String
    public let subnet: IPv4Subnet
    /// Hosts, numbered 1…hosts: the coordinator runs on host 1, workers on the others in turn.
    public let hosts: Int
    public let link: LinkProfile
    /// Seeds the jitter and loss drawn for each packet where ``LinkShaper`` applies them.
    public let seed: UInt64
    /// Whether links may change while the hosts run (``RunningHosts/shape(host:_:)``): they are
    /// shaped from the start even when ``link`` changes nothing.
    public let adjustable: Bool

    /// Hosts allowed (a /25 holds the bridge and 64 hosts).
    public static let hostsRange = 1...64

    public init(
        name: String,
        subnet: IPv4Subnet,
        hosts: Int,
        link: LinkProfile,
        seed: UInt64 = 1,
        adjustable: Bool = false
    ) {
        precondition(Self.hostsRange.contains(hosts) && hosts + 2 < subnet.size, "\(hosts) hosts in \(subnet)")
        self.name = name
        self.subnet = subnet
        self.hosts = hosts
        self.link = link
        self.seed = seed
        self.adjustable = adjustable
    }

    /// The bridge every host's link joins; this namespace reaches the hosts through its address.
    public var bridge: String { "\(name)-br" }
    public var bridgeAddress: String { subnet.address(1) }
    /// Host `host`'s network namespace (`ip netns exec NAME …` runs a command on it).
    public func namespace(_ host: Int) -> String { "\(name)-h\(host)" }
    /// Host `host`'s address.
    public func address(_ host: Int) -> String { subnet.address(1 + host) }
    /// The bridge's end of host `host`'s veth link; the host's end is `eth0` in its namespace.
    func bridgePort(_ host: Int) -> String { "\(name)h\(host)" }

    /// The host a node runs on: the coordinator alone on host 1 (when there are others), each worker
    /// on the next of hosts 2…N in turn.
    public func host(of nodeID: String) -> Int {
        guard hosts > 1, nodeID.hasPrefix("worker-"), let index = Int(nodeID.dropFirst("worker-".count)) else {
            return 1
        }
        return 2 + (index - 1) % (hosts - 1)
    }

    /// The `ip` commands that make the hosts and their links, in order.
    public var creation: [[String]] {
        let prefix = "/\(subnet.prefixLength)"
        var commands = [
            ["ip", "link", "add", bridge, "type", "bridge"],
            ["ip", "addr", "add", bridgeAddress + prefix, "dev", bridge],
            ["ip", "link", "set", bridge, "up"],
        ]
        for host in 1...hosts {
            let namespace = namespace(host)
            commands += [
                ["ip", "netns", "add", namespace],
                ["ip", "link", "add", bridgePort(host), "type", "veth", "peer", "name", "eth0", "netns", namespace],
                ["ip", "link", "set", bridgePort(host), "master", bridge, "up"],
                ["ip", "-n", namespace, "addr", "add", address(host) + prefix, "dev", "eth0"],
                ["ip", "-n", namespace, "link", "set", "eth0", "up"],
                ["ip", "-n", namespace, "link", "set", "lo", "up"],
            ]
        }
        return commands
    }

    /// Every sending side, as (namespace, device): the bridge (what this namespace sends) and each host's
    /// `eth0`, so every packet between any two of them crosses exactly one shaped link.
    var sendingSides: [(namespace: String?, device: String)] {
        [(nil, bridge)] + (1...hosts).map { (namespace($0), "eth0") }
    }

    /// The `tc` commands that shape every sending side: with netem, all of the profile; without it, the
    /// rate alone (`tbf`), delay, jitter and loss being left to ``LinkShaper``.
    public func shaping(netem: Bool) -> [[String]] {
        guard let discipline = Self.discipline(link, netem: netem, always: adjustable) else { return [] }
        return sendingSides.map { side in
            ["tc"] + (side.namespace.map { ["-n", $0] } ?? []) + ["qdisc", "add", "dev", side.device, "root"]
                + discipline
        }
    }

    /// The queueing discipline that applies `link` (with netem: all of it; without: its rate), or nil
    /// when none is needed (unless `always`, with netem).
    static func discipline(_ link: LinkProfile, netem: Bool, always: Bool = false) -> [String]? {
        if netem {
            guard !link.isTransparent || always else { return nil }
            return ["netem"] + (link.isTransparent ? ["delay", "0us"] : link.netemArguments)
        }
        guard let rate = link.rateBitsPerSecond else { return nil }
        // A bucket of 10 ms at the rate (at least 64 KiB, one offloaded TCP segment) and 50 ms of queue.
        return ["tbf", "rate", "\(rate)bit", "burst", "\(max(rate / 8 / 100, 65_536))", "latency", "50ms"]
    }

    /// Whether delay, jitter or loss need ``LinkShaper`` (on a kernel without netem).
    var needsShaper: Bool {
        adjustable || link.delayMicroseconds > 0 || link.jitterMicroseconds > 0 || link.lossPercent > 0
    }

    /// The NFQUEUE number this namespace's shaped traffic goes to (each host's is 0, in its own namespace).
    var bridgeQueue: UInt16 { UInt16(1_000 + (Int(name.dropFirst(2)) ?? 0) % 60_000) }

    /// The iptables rules that send what each side receives to its queue; the one in this namespace
    /// is marked with ``name`` so that it is found and removed by name.
    ///
    /// Held on the receiving side, not the sending one: until a packet leaves its sender's veth it
    /// counts against the sending socket's TCP small-queue limit, so holding it there for a delay
    /// capped each connection at that limit per delay, a cap no real link has. Every packet between
    /// two of them is still held once.
    var queueRules: [[String]] {
        let rule = ["iptables", "-w", "-t", "mangle", "-A", "INPUT"]
        let bypass = ["-j", "NFQUEUE", "--queue-bypass", "--queue-num"]
        return [rule + ["-i", bridge, "-m", "comment", "--comment", name] + bypass + ["\(bridgeQueue)"]]
            + (1...hosts).map { ["ip", "netns", "exec", namespace($0)] + rule + ["-i", "eth0"] + bypass + ["0"] }
    }
}

/// A ``HostTopology`` made real with `ip` and `tc`, removed by ``remove(named:logger:)``.
public enum HostNetwork {
    /// Makes `topology`, runs `body`, removes the topology. A guard process (`tessera cluster
    /// clean-hosts --name … --after-stdin-closes`, in a session of its own) removes it too when this
    /// process dies without doing so, even by SIGKILL: its standard input closes with this process.
    ///
    /// - Throws: ``HostSetupError`` when the topology cannot be made (nothing of it is left), or what
    ///   `body` throws.
    public static func withHosts<T: Sendable>(
        _ topology: HostTopology,
        binary: FilePath,
        logger: Logger,
        _ body: @Sendable (RunningHosts) async throws -> T
    ) async throws -> T {
        var platform = PlatformOptions()
        platform.createSession = true
        let outcome = try await Subprocess.run(
            .path(binary),
            arguments: ["cluster", "clean-hosts", "--name", topology.name, "--after-stdin-closes"],
            platformOptions: platform,
            input: .inputWriter,
            output: .discarded,
            error: .fileDescriptor(.standardError, closeAfterSpawningProcess: false)
        ) { execution -> Result<T, any Error> in
            let result: Result<T, any Error>
            do {
                let hosts = try await create(topology, logger: logger)
                do { result = .success(try await body(hosts)) } catch { result = .failure(error) }
                hosts.shaper?.stop()
                await remove(named: topology.name, logger: logger)
            } catch {
                result = .failure(error)
            }
            // The guard removes what is left (nothing, normally) and exits.
            try? await execution.standardInputWriter.finish()
            return result
        }
        return try outcome.closureResult.get()
    }

    /// Makes `topology`; returns it running, with the shaper its links need on a kernel without netem
    /// (stop that before removing the topology). On any failure removes whatever was made and throws a
    /// ``HostSetupError`` that names the command and what it answered.
    public static func create(_ topology: HostTopology, logger: Logger) async throws(HostSetupError) -> RunningHosts {
        let shaping: (netem: Bool, shaper: LinkShaper?)
        do {
            shaping = try await make(topology)
        } catch {
            await remove(named: topology.name, logger: logger)
            throw HostSetupError(description: "\(error)")
        }
        let link = topology.link
        let shapers =
            shaping.netem
            ? ["netem"]
            : [
                link.rateBitsPerSecond == nil ? nil : "tbf",
                shaping.shaper == nil ? nil : "NFQUEUE (seed \(topology.seed))",
            ].compactMap { $0 }
        logger.info(
            "hosts made",
            metadata: [
                "hosts": "\(topology.hosts)", "subnet": "\(topology.subnet)", "bridge": "\(topology.bridge)",
                "link": "\(link)",
                "shaped by": "\(shapers.isEmpty ? "nothing" : shapers.joined(separator: " and "))",
            ]
        )
        return RunningHosts(topology: topology, shaper: shaping.shaper, netem: shaping.netem)
    }

    private static func make(_ topology: HostTopology) async throws -> (netem: Bool, shaper: LinkShaper?) {
        let taken = try await addressesInUse()
        if let clash = taken.first(where: { $0.overlaps(topology.subnet) }) {
            throw LaunchError(
                "the range \(topology.subnet) overlaps \(clash), an address or route of this machine; choose another network.subnet"
            )
        }
        for command in topology.creation { try await run(command) }
        guard !topology.link.isTransparent || topology.adjustable else { return (false, nil) }
        do {
            for command in topology.shaping(netem: true) { try await run(command) }
            return (true, nil)
        } catch let error as LaunchError where error.description.contains("qdisc kind is unknown") {
            // This kernel has no netem (CONFIG_NET_SCH_NETEM): the rate by tbf, the rest by NFQUEUE.
        }
        for command in topology.shaping(netem: false) { try await run(command) }
        guard topology.needsShaper else { return (false, nil) }
        var queues = [try LinkShaper.open(queue: topology.bridgeQueue)]
        do {
            for host in 1...topology.hosts {
                queues.append(try inNamespace(topology.namespace(host)) { try LinkShaper.open(queue: 0) })
            }
        } catch {
            for queue in queues { close(queue.socket) }
            throw error
        }
        let shaper = try LinkShaper(
            queues: queues,
            links: [LinkProfile](repeating: topology.link, count: queues.count),
            seed: topology.seed
        )
        do {
            for rule in topology.queueRules { try await run(rule) }
        } catch {
            shaper.stop()
            throw error
        }
        return (false, shaper)
    }

    /// The first /24 of 10.213.0.0 … 10.250.255.0 that no address or route on this machine overlaps,
    /// searched from a point that `seed` picks so that launchers running at once choose apart.
    public static func freeSubnet(seed: Int) async throws -> IPv4Subnet {
        let taken = try await addressesInUse()
        let first = IPv4Subnet("10.213.0.0/24")!.base >> 8
        let count = (250 - 213 + 1) * 256
        for step in 0..<count {
            let candidate = IPv4Subnet(base: (first + UInt32((seed + step) % count)) << 8, prefixLength: 24)
            if !taken.contains(where: { $0.overlaps(candidate) }) { return candidate }
        }
        throw LaunchError("no free /24 in 10.213.0.0-10.250.255.255 for the hosts; give network.subnet")
    }

    /// Removes every namespace and interface whose name starts with `name`, killing what still runs in
    /// those namespaces, and the iptables rule marked with `name` in this one. Best effort: what cannot
    /// be removed is logged, and the rest still goes.
    public static func remove(named name: String, logger: Logger) async {
        do {
            // No iptables here: no rule either (the hosts were shaped by netem or not at all).
            let rules = (try? await run(["iptables", "-w", "-t", "mangle", "-S"])) ?? ""
            for rule in rules.split(separator: "\n") where rule.split(separator: " ").contains(Substring(name)) {
                let words = rule.split(separator: " ").map(String.init)
                try await run(["iptables", "-w", "-t", "mangle", "-D"] + words.dropFirst())
            }
            for namespace in try await namespaces(named: "\(name)-h") {
                let pids = try await run(["ip", "netns", "pids", namespace]).split(separator: "\n")
                for pid in pids.compactMap({ Int32($0) }) { _ = kill(pid, SIGKILL) }
                try await run(["ip", "netns", "del", namespace])
            }
            // A namespace lives on while a killed process in it is not yet reaped, and its veth with
            // it; deleting the bridge's end deletes the pair now (unless the kernel got there first).
            for interface in try await interfaces(named: name) { _ = try? await run(["ip", "link", "del", interface]) }
            let left = try await interfaces(named: name)
            guard left.isEmpty else { throw LaunchError("interfaces left: \(left.joined(separator: ", "))") }
        } catch {
            logger.error("hosts not fully removed", metadata: ["name": "\(name)", "error": "\(error)"])
        }
    }

    /// Names of the interfaces in this namespace that start with `name`.
    public static func interfaces(named name: String) async throws -> [String] {
        try await run(["ip", "-o", "link", "show"]).split(separator: "\n").compactMap { line in
            // "7: ts123h1@if6: <BROADCAST,…" → "ts123h1"
            let fields = line.split(separator: " ")
            guard fields.count > 1 else { return nil }
            let interface = String(fields[1].prefix { $0 != "@" && $0 != ":" })
            return interface.hasPrefix(name) ? interface : nil
        }
    }

    /// Namespaces whose names start with `name`.
    public static func namespaces(named name: String) async throws -> [String] {
        try await run(["ip", "netns", "list"]).split(separator: "\n")
            .compactMap { $0.split(separator: " ").first.map(String.init) }
            .filter { $0.hasPrefix(name) }
    }

    /// Prefixes of topologies whose launcher (the pid in `ts<pid>`) is gone.
    public static func orphans() async throws -> [String] {
        let names = try await namespaces(named: "ts") + interfaces(named: "ts")
        let prefixes = Set(
            names.compactMap { name -> String? in
                let digits = name.dropFirst(2).prefix { $0.isNumber }
                guard let pid = Int32(digits), !digits.isEmpty else { return nil }
                return kill(pid, 0) == 0 || errno == EPERM ? nil : "ts\(digits)"
            }
        )
        return prefixes.sorted()
    }

    /// Every IPv4 range assigned or routed on this machine's own namespace.
    static func addressesInUse() async throws -> [IPv4Subnet] {
        let addresses = try await run(["ip", "-4", "-o", "addr", "show"]).split(separator: "\n").compactMap { line in
            line.split(separator: " ").drop { $0 != "inet" }.dropFirst().first.flatMap { IPv4Subnet(String($0)) }
        }
        let routes = try await run(["ip", "-4", "route", "show"]).split(separator: "\n").compactMap { line in
            line.split(separator: " ").first.flatMap { destination in
                IPv4Subnet(destination.contains("/") ? String(destination) : "\(destination)/32")
            }
        }
        return addresses + routes
    }

    /// Runs `command` (its first element looked up on PATH); returns its output, or throws naming the
    /// command and its error output.
    @discardableResult
    static func run(_ command: [String]) async throws -> String {
        let result: ExecutionResult<Void, StringOutput<UTF8>, StringOutput<UTF8>>
        do {
            result = try await Subprocess.run(
                .name(command[0]),
                arguments: Arguments(Array(command.dropFirst())),
                output: .string(limit: 1 << 20),
                error: .string(limit: 1 << 16)
            )
        } catch {
            throw LaunchError("cannot run `\(command.joined(separator: " "))`: \(error)")
        }
        guard result.terminationStatus.isSuccess else {
            let answer = result.standardError.split(separator: "\n").joined(separator: "; ")
            throw LaunchError("`\(command.joined(separator: " "))` failed (\(result.terminationStatus)): \(answer)")
        }
        return result.standardOutput
    }
}

/// Hosts made by ``HostNetwork/withHosts(_:binary:logger:_:)``: their plan, and the means to change
/// their links while they run.
public final class RunningHosts: Sendable {
    public let topology: HostTopology
    let shaper: LinkShaper?
    /// Whether netem shapes the links (else tbf and ``LinkShaper``).
    let netem: Bool

    init(topology: HostTopology, shaper: LinkShaper?, netem: Bool) {
        self.topology = topology
        self.shaper = shaper
        self.netem = netem
    }

    /// Takes host `host`'s link down (a partition the kernel enforces: nothing reaches or leaves the
    /// host) or brings it back up.
    public func setLink(host: Int, up: Bool) async throws {
        try await HostNetwork.run(["ip", "-n", topology.namespace(host), "link", "set", "eth0", up ? "up" : "down"])
    }

    /// From now on host `host`'s link is as `link` says (a latency spike, a loss burst), so every round
    /// trip with the host crosses it once: netem shapes what the host sends, ``LinkShaper`` what it
    /// receives. `nil` gives it the topology's link again. Needs an ``HostTopology/adjustable`` topology.
    public func shape(host: Int, _ link: LinkProfile?) async throws {
        guard topology.adjustable else {
            throw LaunchError("the hosts' links were made fixed; make the topology adjustable to change them")
        }
        let link = link ?? topology.link
        let qdisc = ["tc", "-n", topology.namespace(host), "qdisc"]
        if let discipline = HostTopology.discipline(link, netem: netem, always: true) {
            try await HostNetwork.run(qdisc + ["replace", "dev", "eth0", "root"] + discipline)
        } else {
            // No rate any more: the default queue again (there may have been none to delete).
            _ = try? await HostNetwork.run(qdisc + ["del", "dev", "eth0", "root"])
        }
        // Queue 0 is the bridge's, queue K host K's.
        shaper?.setLink(host, link)
    }
}

/// Hosts that could not be made; nothing of them is left.
public struct HostSetupError: Error, CustomStringConvertible {
    public var description: String
}

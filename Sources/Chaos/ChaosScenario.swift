public import ClusterAdmin
import FoundationEssentials
public import KVCacheCore
public import Workloads
import Yams

/// A fault-injection scenario: the cluster, the traffic (every sequence decodes in lockstep, one step
/// at a time) and the faults, each applied before a given decode step.
public struct ChaosScenario: Sendable {
    /// A process fault (by signal or restart) or a network fault (through the transport's fault
    /// injection, set on the admin endpoints).
    public enum Action: String, Sendable, CaseIterable {
        /// SIGKILL: the worker dies at once.
        case kill
        /// SIGSTOP: the worker (or the coordinator) freezes, a gray failure, until `resume`.
        case pause
        /// SIGCONT after a pause.
        case resume
        /// SIGTERM: a graceful stop.
        case terminate
        /// SIGTERM, then a new process with the same node id (a new incarnation); for the
        /// coordinator, SIGKILL and a new one on the same port. A worker restart first waits until
        /// every shard has its full replication again, as a rolling restart would.
        case restart
        /// Cut the worker off: the coordinator drops every frame to and from it, and the worker drops
        /// every frame it receives (from clients and from primaries), until `heal`.
        case partition
        /// End a partition: both fault plans back to none.
        case heal
        /// With `--hosts`: the target's host sends as the fault's `network` says from now on (a latency
        /// spike, a loss burst), e.g. `network: delay=50ms,loss=2%`.
        case degrade
        /// With `--hosts`: the target's host link back to the cluster's profile.
        case restore
    }

    /// Which worker a fault hits, chosen when it is applied.
    public enum Target: Sendable, Hashable {
        /// The current primary of sequence 0's first shard.
        case primary
        /// The first current replica of sequence 0's first shard.
        case replica
        /// The worker a previous fault of this scenario hit (to resume a paused one).
        case previous
        /// A worker by node id, e.g. `worker-2`.
        case node(String)
        /// The coordinator (with `restart`, `pause` or `resume`).
        case coordinator
    }

    public struct Fault: Sendable {
        public var beforeStep: Int
        public var action: Action
        public var target: Target
        /// The fault is applied no sooner than this long after the previous one (the steps before
        /// `beforeStep` run meanwhile; the runner waits if they finish sooner), e.g. to hold a pause
        /// past the failure detector's dead-after time.
        public var afterMillis: Int
        /// What a `degrade` gives the target's host link.
        public var network: LinkProfile?
    }

    /// Whether a fault changes hosts' links (`degrade`, `restore`), so the scenario needs `--hosts`.
    public var changesLinks: Bool { faults.contains { [.degrade, .restore].contains($0.action) } }

    public var name: String
    public var workers: Int
    public var replication: Int
    public var preset: WorkloadPreset
    public var geometry: ModelGeometry
    public var policy: CompressionPolicy
    public var policyName: String
    public var budget: Double
    public var sequences: Int
    public var decodeTokens: Int
    public var seed: UInt64
    public var faults: [Fault]
    /// A transport fault plan every worker applies to the connections it accepts (`tessera worker
    /// --faults`), e.g. `corrupt=0.03,direction=inbound,seed=5`.
    public var workerFaults: String?

    /// Reads and validates a scenario file; errors name the file, the field and what is allowed.
    public static func load(path: String) throws(ChaosError) -> ChaosScenario {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ChaosError("\(path): cannot read the scenario: \(error)")
        }
        return try parse(yaml: text, source: path)
    }

    public static func parse(yaml: String, source: String) throws(ChaosError) -> ChaosScenario {
        let root: [String: Any]
        do {
            guard let map = try Yams.load(yaml: yaml) as? [String: Any] else {
                throw ChaosError("\(source): a scenario is a mapping of keys")
            }
            root = map
        } catch let error as ChaosError {
            throw error
        } catch {
            throw ChaosError("\(source): not valid YAML: \(error)")
        }
        let fields = Fields(root, source: source, path: "")
        try fields.only([
            "name", "workers", "replication", "workload", "model", "policy", "budget", "sequences", "decodeTokens",
            "seed", "faults", "workerFaults",
        ])
        let model = try fields.string("model", default: "tiny")
        let policyName = try fields.string("policy", default: "madakv")
        var scenario = ChaosScenario(
            name: try fields.string("name", default: source),
            workers: try fields.int("workers", default: 3, in: 1...16),
            replication: try fields.int("replication", default: 2, in: 1...16),
            preset: .imageQA,
            geometry: .tiny,
            policy: .full,
            policyName: policyName,
            budget: try fields.double("budget", default: 0.2, in: 0.01...1),
            sequences: try fields.int("sequences", default: 6, in: 1...256),
            decodeTokens: try fields.int("decodeTokens", default: 32, in: 2...4096),
            seed: UInt64(try fields.int("seed", default: 1, in: 0...Int.max)),
            faults: [],
            workerFaults: root["workerFaults"] == nil ? nil : try fields.string("workerFaults", default: "")
        )
        do {
            scenario.preset = try WorkloadPreset.named(try fields.string("workload", default: "image-qa"))
            scenario.geometry = try ModelGeometry.preset(named: model)
            scenario.policy = try CompressionPolicy.named(policyName)
        } catch let error as ChaosError {
            throw error
        } catch {
            throw ChaosError("\(source): \(error)")
        }
        guard scenario.replication <= scenario.workers else {
            throw ChaosError(
                "\(source): replication (\(scenario.replication)) must not exceed workers (\(scenario.workers))"
            )
        }
        let list = root["faults"] as? [Any] ?? []
        guard !list.isEmpty || scenario.workerFaults != nil else {
            throw ChaosError(
                "\(source): faults must be a non-empty list of {beforeStep, action, target} (or set workerFaults)"
            )
        }
        for (index, item) in list.enumerated() {
            guard let map = item as? [String: Any] else {
                throw ChaosError("\(source): faults[\(index)] must be a mapping {beforeStep, action, target}")
            }
            let fault = Fields(map, source: source, path: "faults[\(index)].")
            try fault.only(["beforeStep", "action", "target", "afterMillis", "network"])
            let actionName = try fault.string("action", default: "")
            guard let action = Action(rawValue: actionName) else {
                throw ChaosError(
                    "\(source): faults[\(index)].action '\(actionName)' is not one of "
                        + Action.allCases.map(\.rawValue).joined(separator: ", ")
                )
            }
            let targetName = try fault.string("target", default: "primary")
            let target: Target =
                switch targetName {
                case "primary": .primary
                case "replica": .replica
                case "previous": .previous
                case "coordinator": .coordinator
                default: .node(targetName)
                }
            if case .node(let id) = target, !id.hasPrefix("worker-") {
                throw ChaosError(
                    "\(source): faults[\(index)].target '\(id)' is not primary, replica, previous, coordinator or a "
                        + "worker id (worker-N)"
                )
            }
            if target == .coordinator, ![.restart, .pause, .resume, .degrade, .restore].contains(action) {
                throw ChaosError(
                    "\(source): faults[\(index)]: the coordinator can only be restarted, paused, resumed, degraded or "
                        + "restored (action: restart, pause, resume, degrade or restore)"
                )
            }
            var network: LinkProfile?
            if action == .degrade {
                let spec = try fault.string("network", default: "")
                do { network = try NetworkSettings().merging(spec).link() } catch {
                    throw ChaosError("\(source): faults[\(index)].network: \(error) (e.g. delay=50ms,loss=2%)")
                }
            } else if map["network"] != nil {
                throw ChaosError("\(source): faults[\(index)].network belongs to a degrade fault only")
            }
            scenario.faults.append(
                Fault(
                    beforeStep: try fault.int("beforeStep", default: 0, in: 0...(scenario.decodeTokens - 1)),
                    action: action,
                    target: target,
                    afterMillis: try fault.int("afterMillis", default: 0, in: 0...600_000),
                    network: network
                )
            )
        }
        return scenario
    }
}

/// A scenario that cannot run, or a run that could not be carried out, with the reason.
public struct ChaosError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Typed access to a YAML mapping with errors that name the field.
private struct Fields {
    let map: [String: Any]
    let source: String
    let path: String

    init(_ map: [String: Any], source: String, path: String) {
        self.map = map
        self.source = source
        self.path = path
    }

    func only(_ keys: Set<String>) throws(ChaosError) {
        if let unknown = map.keys.sorted().first(where: { !keys.contains($0) }) {
            throw ChaosError(
                "\(source): unknown key '\(path)\(unknown)'; allowed: \(keys.sorted().joined(separator: ", "))"
            )
        }
    }

    func string(_ key: String, default value: String) throws(ChaosError) -> String {
        guard let raw = map[key] else { return value }
        guard let text = raw as? String else { throw ChaosError("\(source): \(path)\(key) must be a string") }
        return text
    }

    func int(_ key: String, default value: Int, in range: ClosedRange<Int>) throws(ChaosError) -> Int {
        guard let raw = map[key] else { return value }
        guard let number = raw as? Int, range.contains(number) else {
            throw ChaosError("\(source): \(path)\(key) must be an integer in \(range), got \(raw)")
        }
        return number
    }

    func double(_ key: String, default value: Double, in range: ClosedRange<Double>) throws(ChaosError) -> Double {
        guard let raw = map[key] else { return value }
        guard let number = (raw as? Double) ?? (raw as? Int).map(Double.init), range.contains(number) else {
            throw ChaosError("\(source): \(path)\(key) must be a number in \(range), got \(raw)")
        }
        return number
    }
}

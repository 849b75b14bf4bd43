import Client
import ClusterSecurity
package import ClusterTransport
import ClusterWire
import Coordinator
import Evaluation
import KVCacheCore
package import Logging
import SwiftProtobuf
import Synchronization
import Worker
import Workloads

/// A kind of fault the simulation injects, each undone a while later.
package enum FaultKind: String, CaseIterable, Sendable, Comparable {
    /// A worker, or the coordinator, crashes (a worker half the time stopping as on SIGTERM: it leaves
    /// the cluster first) and restarts as a new incarnation.
    case crash
    /// Two nodes cannot reach each other: their connections reset, new ones are refused.
    case partition
    /// The frames between two nodes are held, connections up, then delivered in order.
    case stall
    /// Every frame to and from one node is held, as its peers see a paused process.
    case pause
    /// The frames between two nodes are delivered twice, each copy right after its original.
    case duplicate

    /// What `tessera simulate` injects unless told otherwise (and CI's 10,000 seeds run): every kind.
    package static let standard = Set(allCases)

    package static func < (lhs: Self, rhs: Self) -> Bool {
        allCases.firstIndex(of: lhs)! < allCases.firstIndex(of: rhs)!
    }
}

/// What one simulated schedule runs.
package struct SimulationSettings: Sendable {
    package var workers = 3
    package var clients = 2
    package var sequencesPerClient = 4
    package var decodeSteps = 4
    package var replication = 2
    /// The kinds of fault injected while the clients run; none when empty.
    package var faults: Set<FaultKind> = FaultKind.standard
    /// A client of its own tenant replays the cluster's recent requests, a few bytes changed, to
    /// the coordinator and the workers while the clients run; none when false.
    package var intruder = true
    /// Faults stop this long after the start (or when the clients finish, if sooner).
    package var faultWindow: Duration = .seconds(20)
    /// Simulated time by which the schedule must have ended (clients done, cluster drained).
    package var limit: Duration = .seconds(900)
    /// The coordinator's memory limit: small enough that admission refuses and clients wait.
    package var memoryLimitBytes: UInt64 = 1_000_000
    /// The nodes' own log lines at this level and above go into the trace; none when nil.
    package var logLevel: Logger.Level?
    /// Protections switched off in every node, to show the invariants catch their absence.
    package var weakened: Set<Protection> = []

    package init() {}
}

/// How one schedule went.
package struct SimulationReport: Sendable {
    package var seed: UInt64
    /// Invariants that failed, each with the simulated time it was seen.
    package var violations: [String] = []
    /// What happened, in order: faults, sequences, violations.
    package var trace: [String] = []
    package var sequencesCompleted = 0
    /// Sequences a client gave up on (every copy of a shard lost, or a wait ran out): allowed under
    /// faults, as long as no acknowledged step was lost or changed.
    package var sequencesFailed = 0
    package var faults = 0
    /// The intruder's messages by how they ended: the refusal's code (`UNAVAILABLE` also when no
    /// answer came within 2 s or a fault cut it off), `status` (a status listing no sequence),
    /// `one-way` (sent, no answer expected) or `answered` (a violation).
    package var intrusions: [String: Int] = [:]
    package var simulatedTime = Duration.zero
    package var jobs = 0
    package var frames = 0

    package var passed: Bool { violations.isEmpty }
}

package enum Simulation {
    /// Runs the schedule `seed` to its end on the calling thread; the same seed gives the same report.
    package static func run(seed: UInt64, settings: SimulationSettings = .init()) -> SimulationReport {
        World(seed: seed, settings: settings).run()
    }

    /// A sequence the clients may run: a prompt of the `image-qa` workload on the `tiny` model, a
    /// policy and a retention. Their fault-free outputs are computed once per process.
    struct Spec: Hashable {
        var index: Int
        var policy: String
        var retention: Double
    }

    static let workloadSeed: UInt64 = 0x7E55_E7A
    static let policies = ["snapkv", "vl-cache", "madakv", "look-m", "h2o", "pyramidkv"]
    static let retentions = [0.2, 0.5]
    static let prompts = 3

    static func traceSettings(decodeSteps: Int) -> TraceSettings {
        var settings = TraceSettings()
        settings.decodeSteps = decodeSteps
        settings.imagesPerRequest = 1...1
        settings.documentTextTokens = 32...64
        return settings
    }

    private static let references = Mutex<[Spec: [[Int: [Float]]]]>([:])

    /// The outputs of every decode step of `spec` on one process with no faults (`ReferenceDecode`,
    /// which the chaos tests hold the cluster to bit for bit).
    static func reference(_ spec: Spec, trace: SequenceTrace) throws -> [[Int: [Float]]] {
        if let known = references.withLock({ $0[spec] }) { return known }
        let outputs = try ReferenceDecode.outputs(
            trace,
            policy: try CompressionPolicy.named(spec.policy),
            retention: spec.retention
        )
        references.withLock { $0[spec] = outputs }
        return outputs
    }
}

/// One schedule: the coordinator, the workers and the clients as tasks on one scheduler, over the
/// simulated network; faults drawn from the seed.
private final class World: Sendable {
    let settings: SimulationSettings
    let scheduler = Scheduler()
    let network: SimulatedNetwork
    private let random: Mutex<SplitMix64>
    private let ledger: Ledger
    /// The processes running now; a crashed one is absent until it restarts.
    private let processes = Mutex<[String: Process]>([:])
    private let incarnations = Mutex<[String: UInt64]>([:])
    let coordinatorAddress = NodeAddress(host: "coordinator", port: 7000)

    struct Process {
        var task: Task<Void, Never>
        var worker: WorkerService?
        var coordinator: CoordinatorService?
    }

    init(seed: UInt64, settings: SimulationSettings) {
        self.settings = settings
        random = Mutex(SplitMix64(state: seed))
        let ledger = Ledger(seed: seed, scheduler: scheduler)
        self.ledger = ledger
        network = SimulatedNetwork(scheduler: scheduler, seed: seed ^ 0x5EED) { request, reply, from, to in
            ledger.check(request, reply, from: from, to: to)
        }
        // Every node proves who it is, as over mutual TLS: the handlers authorize as in production.
        network.certify("coordinator", as: CertifiedIdentity(role: .coordinator, nodeID: "coordinator"))
        for index in 1...settings.workers {
            network.certify(workerName(index), as: CertifiedIdentity(role: .worker, nodeID: workerName(index)))
        }
        for index in 1...settings.clients {
            network.certify(
                clientName(index),
                as: CertifiedIdentity(role: .client, nodeID: clientName(index), tenant: "tenant-\(index)")
            )
        }
        network.certify(
            Self.intruder,
            as: CertifiedIdentity(role: .client, nodeID: Self.intruder, tenant: Self.intruder)
        )
        network.certify(Self.intruderWorker, as: CertifiedIdentity(role: .worker, nodeID: Self.intruderWorker))
    }

    func run() -> SimulationReport {
        let finished = Flag()
        let main = Task(executorPreference: scheduler) {
            await self.schedule()
            finished.raise()
        }
        let ended = scheduler.run(until: settings.limit) { finished.isRaised }
        if !ended {
            violate("liveness: the schedule did not end within \(settings.limit) of simulated time")
            // Unwind every task so none outlives the run (they hold the scheduler).
            main.cancel()
            for (_, process) in runningInOrder { process.task.cancel() }
            _ = scheduler.run(until: .seconds(Int64.max / 2_000_000_000_000)) { finished.isRaised }
        }
        if scheduler.foreignJobs > 0 {
            violate(
                "determinism: \(scheduler.foreignJobs) jobs arrived from outside the simulation's thread (a real clock or thread in the code under test)"
            )
        }
        return ledger.report.withLock { report in
            report.simulatedTime = scheduler.now
            report.jobs = scheduler.jobsRun
            report.frames = network.frames
            return report
        }
    }

    // MARK: The schedule

    private func schedule() async {
        start("coordinator")
        for index in 1...settings.workers { start(workerName(index)) }
        guard await waitUntil(within: .seconds(30), { await self.registered() }) else {
            violate("liveness: the workers did not all register within 30 s of starting")
            await stopAll()
            return
        }
        let clientsDone = Flag()
        await withDiscardingTaskGroup { group in
            group.addTask {
                await withDiscardingTaskGroup { clients in
                    for index in 1...self.settings.clients { clients.addTask { await self.client(index) } }
                }
                clientsDone.raise()
            }
            if !settings.faults.isEmpty {
                group.addTask { await self.injectFaults(until: { clientsDone.isRaised }) }
            }
            if settings.intruder {
                group.addTask { await self.intrude(until: { clientsDone.isRaised }) }
                group.addTask { await self.forgeStatistics(until: { clientsDone.isRaised }) }
            }
            group.addTask { await self.watchMemory(until: { clientsDone.isRaised }) }
        }
        // Faults are over: every node back, the network whole; everything the clients closed must
        // drain from the accounting and the workers.
        network.heal()
        for name in ["coordinator"] + (1...settings.workers).map(workerName)
        where processes.withLock({ $0[name] == nil }) {
            log("restart \(name) (faults over)")
            start(name)
        }
        let drained = await waitUntil(within: .seconds(120)) { await self.drained() }
        if !drained {
            violate("liveness: closed sequences never drained: \(await leftovers().joined(separator: "; "))")
        }
        await stopAll()
    }

    private func workerName(_ index: Int) -> String { "worker-\(index)" }

    private func clientName(_ index: Int) -> String { "client-\(index)" }

    // MARK: Processes

    private func start(_ name: String) {
        let node = network.node(name)
        let incarnation = incarnations.withLock { known in
            known[name, default: 0] += 1
            return known[name]!
        }
        let process: Process
        if name == "coordinator" {
            var configuration = CoordinatorConfiguration(
                // As a coordinator process's: nanoseconds of the (simulated) clock when it starts.
                incarnation: UInt64(scheduler.now / .nanoseconds(1)) + incarnation,
                listen: coordinatorAddress,
                security: .insecure,
                memoryLimitBytes: settings.memoryLimitBytes,
                // No tightening: the fault-free reference keeps each sequence's own retention.
                floorRatio: 1,
                replication: settings.replication,
                startsNewCluster: incarnation == 1
            )
            configuration.weakened = settings.weakened
            // The configuration above is valid by construction.
            let service = try! CoordinatorService(configuration: configuration, logger: logger(name), network: node)
            process = Process(
                task: Task(executorPreference: scheduler) { try? await service.run() },
                coordinator: service
            )
        } else {
            var configuration = WorkerConfiguration(
                nodeID: name,
                incarnation: incarnation,
                listen: NodeAddress(host: name, port: 0),
                coordinator: coordinatorAddress,
                security: .insecure
            )
            configuration.weakened = settings.weakened
            let service = WorkerService(configuration: configuration, logger: logger(name), network: node, threads: nil)
            process = Process(task: Task(executorPreference: scheduler) { try? await service.run() }, worker: service)
        }
        processes.withLock { $0[name] = process }
    }

    /// Kills the process: its connections reset at once, its tasks unwind, its memory is gone.
    private func stop(_ name: String) async {
        guard let process = processes.withLock({ $0.removeValue(forKey: name) }) else { return }
        network.crash(name)
        process.task.cancel()
        await process.task.value
    }

    private var running: [String: Process] { processes.withLock { $0 } }

    /// The running processes by name, in name order (a walk in a fixed order keeps runs reproducible).
    private var runningInOrder: [(name: String, process: Process)] {
        running.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    private func stopAll() async {
        for (name, _) in runningInOrder { await stop(name) }
    }

    private func registered() async -> Bool {
        guard let coordinator = running["coordinator"]?.coordinator else { return false }
        return await coordinator.liveWorkers() == settings.workers
    }

    /// Closed sequences gone everywhere: nothing accounted, nothing held.
    private func drained() async -> Bool { await leftovers().isEmpty }

    /// What is still accounted or held, by node.
    private func leftovers() async -> [String] {
        var left: [String] = []
        for (name, process) in runningInOrder {
            if let accounted = await process.coordinator?.accounted(), accounted.bytes > 0 {
                left.append("\(name) accounts \(accounted.bytes) bytes for \(accounted.sequences.keys.sorted())")
            }
            if let held = await process.worker?.held(), held.bytes > 0 || !held.sequences.isEmpty {
                left.append("\(name) holds \(held.bytes) bytes of \(held.sequences)")
            }
        }
        return left
    }

    // MARK: Clients

    private func client(_ index: Int) async {
        let name = clientName(index)
        do {
            try await TesseraClient.withClient(
                coordinator: coordinatorAddress,
                network: network.node(name),
                tenant: "tenant-\(index)",
                nodeID: name,
                logger: logger(name)
            ) { client in
                for k in 0..<self.settings.sequencesPerClient {
                    let spec = self.draw { random in
                        Simulation.Spec(
                            index: Int(random.next() % UInt64(Simulation.prompts)),
                            policy: Simulation.policies[Int(random.next() % UInt64(Simulation.policies.count))],
                            retention: Simulation.retentions[Int(random.next() % UInt64(Simulation.retentions.count))]
                        )
                    }
                    await self.drive(UInt64(index) << 16 | UInt64(k + 1), spec, client: client)
                }
            }
        } catch {
            log("\(name) could not reach the coordinator: \(error)")
        }
    }

    /// Opens, prefills, decodes and closes one sequence, checking every acknowledged step against
    /// the fault-free outputs. Waits out refusals and unavailability as a patient client would.
    private func drive(_ id: UInt64, _ spec: Simulation.Spec, client: TesseraClient) async {
        let trace = TraceGenerator(
            preset: .imageQA,
            geometry: .tiny,
            settings: Simulation.traceSettings(decodeSteps: settings.decodeSteps),
            seed: Simulation.workloadSeed
        ).sequence(spec.index)
        let expected: [[Int: [Float]]]
        do {
            expected = try Simulation.reference(spec, trace: trace)
        } catch {
            violate("the reference decode of \(spec) failed: \(error)")
            return
        }
        log("sequence \(id): open (\(spec.policy) at \(spec.retention), prompt \(spec.index))")
        do {
            var attempts = 0
            try await patiently("open \(id)") {
                attempts += 1
                do {
                    _ = try await client.openSequence(
                        id,
                        geometry: .tiny,
                        layout: trace.layout,
                        policy: try CompressionPolicy.named(spec.policy),
                        retention: spec.retention,
                        decodeTokens: self.settings.decodeSteps
                    )
                } catch let error as WireError where error.code == .badRequest && attempts > 1 {
                    // An earlier attempt was admitted but its answer was lost.
                    _ = try await client.refreshPlacement(id)
                }
            }
            _ = try await client.prefillSynthetic(
                id,
                workload: WorkloadPreset.imageQA.rawValue,
                seed: Simulation.workloadSeed,
                index: spec.index,
                settings: Simulation.traceSettings(decodeSteps: settings.decodeSteps)
            )
            let clock = SimulatedClock(scheduler: scheduler)
            for step in 0..<settings.decodeSteps {
                // Tokens arrive at a client's pace, so faults land between and during steps.
                try await clock.sleep(for: .milliseconds(Int64(draw { $0.next() % 400 })))
                let outputs = try await client.decode(id, step: step, geometry: .tiny)
                if !Self.identical(outputs, expected[step]) {
                    violate(
                        "sequence \(id) step \(step) was acknowledged with outputs that differ from the fault-free run"
                    )
                }
            }
            ledger.report.withLock { $0.sequencesCompleted += 1 }
            log("sequence \(id): decoded \(settings.decodeSteps) steps")
        } catch {
            ledger.report.withLock { $0.sequencesFailed += 1 }
            log("sequence \(id): gave up: \(error)")
            if let error = error as? WireError, !Self.faultsExplain(error) {
                violate(
                    "sequence \(id): a well-formed request was refused with \(error.code), which no fault explains: \(error)"
                )
            }
        }
        do {
            try await patiently("close \(id)") {
                do {
                    _ = try await client.close(id)
                } catch let error as WireError where error.code == .unknownSequence {
                    return  // never admitted, or closed by an attempt whose answer was lost
                }
            }
        } catch {
            violate("liveness: sequence \(id) could not be closed: \(error)")
        }
    }

    /// Retries `body` while the cluster is unavailable or full, for up to two simulated minutes.
    private func patiently(_ what: String, _ body: () async throws -> Void) async throws {
        let clock = SimulatedClock(scheduler: scheduler)
        let deadline = clock.now.advanced(by: .seconds(120))
        var backoff = Duration.milliseconds(100)
        while true {
            do {
                return try await body()
            } catch let error as WireError
                where [.unavailable, .resourceExhausted, .notPrimary, .staleEpoch].contains(error.code)
                && clock.now < deadline
            {
                if error.code == .resourceExhausted { log("\(what): refused, the cluster is full; waiting") }
                try await clock.sleep(for: error.retryAfter ?? backoff)
                backoff = min(backoff * 2, .seconds(2))
            }
        }
    }

    /// What crashes and partitions can make a patient client give up with: no answer in time, every
    /// copy gone, the cluster full, a placement that kept moving. Anything else (BAD_REQUEST for a
    /// step out of order, INVALID_VALUE, INTERNAL, ...) means the cluster lost or broke state.
    private static func faultsExplain(_ error: WireError) -> Bool {
        [.unavailable, .unknownSequence, .resourceExhausted, .staleEpoch, .notPrimary].contains(error.code)
    }

    private static func identical(_ a: [Int: [Float]], _ b: [Int: [Float]]) -> Bool {
        a.count == b.count
            && a.allSatisfy { layer, values in
                guard let other = b[layer], other.count == values.count else { return false }
                return zip(values, other).allSatisfy { $0.bitPattern == $1.bitPattern }
            }
    }

    // MARK: Faults

    /// Until the clients are done (or the fault window closes): every 0.2–1.5 s one fault, undone
    /// 0.3–4 s later: a crash (worker or coordinator), a partition between two nodes, a stalled link
    /// between two nodes, or a paused node; with duplication on, one fault in four instead makes a
    /// link between two nodes deliver every frame twice (drawn apart, so the other kinds' schedules
    /// stay as they were without it). At most one worker is down at a time, so a replicated shard
    /// keeps a copy.
    private func injectFaults(until done: @escaping @Sendable () -> Bool) async {
        let clock = SimulatedClock(scheduler: scheduler)
        await withDiscardingTaskGroup { group in
            while !done(), scheduler.now < settings.faultWindow {
                let (pause, kind, pick, duration) = draw { random in
                    (
                        Duration.milliseconds(200 + Int64(random.next() % 1_300)), random.next() % 6,
                        random.next(), Duration.milliseconds(300 + Int64(random.next() % 3_700))
                    )
                }
                guard (try? await clock.sleep(for: pause)) != nil else { return }
                let workers = (1...settings.workers).map(workerName)
                let nodes = ["coordinator"] + workers + (1...settings.clients).map(clientName)
                let down = workers.filter { running[$0] == nil }
                // The two ends of a link fault: never a node with itself, nor two clients.
                let a = nodes[Int(pick % UInt64(nodes.count))]
                let b = nodes[Int((pick >> 32) % UInt64(nodes.count))]
                let linked = a != b && !(a.hasPrefix("client") && b.hasPrefix("client"))
                if settings.faults.contains(.duplicate), draw({ $0.next() % 4 == 0 }) {
                    guard linked else { continue }
                    log("duplicate \(a) | \(b) for \(duration)")
                    network.duplicate(a, b, until: scheduler.now + duration)
                    ledger.report.withLock { $0.faults += 1 }
                    continue
                }
                let allowed: [FaultKind] = [.crash, .crash, .partition, .partition, .stall, .pause]
                guard settings.faults.contains(allowed[Int(kind)]) else { continue }
                switch kind {
                case 0 where down.isEmpty:
                    let victim = workers[Int(pick % UInt64(workers.count))]
                    // Half the time a stop as SIGTERM makes it: the worker leaves the cluster first.
                    if pick >> 40 & 1 == 1, let worker = running[victim]?.worker {
                        log("stop \(victim), leaving first")
                        await worker.leave(within: .seconds(5))
                    } else {
                        log("crash \(victim)")
                    }
                    await stop(victim)
                    group.addTask {
                        try? await clock.sleep(for: duration)
                        self.log("restart \(victim)")
                        self.start(victim)
                    }
                case 1 where running["coordinator"] != nil:
                    log("crash coordinator")
                    await stop("coordinator")
                    group.addTask {
                        try? await clock.sleep(for: duration)
                        self.log("restart coordinator")
                        self.start("coordinator")
                    }
                case 2, 3, 4:
                    guard linked else { continue }
                    if kind == 4 {
                        log("stall \(a) | \(b) for \(duration)")
                        network.stall(a, b, until: scheduler.now + duration)
                        break
                    }
                    log("partition \(a) | \(b)")
                    network.partition(a, b)
                    group.addTask {
                        try? await clock.sleep(for: duration)
                        self.log("heal \(a) | \(b)")
                        self.network.heal(a, b)
                    }
                case 5:
                    let victim = nodes[Int(pick % UInt64(nodes.count))]
                    log("pause \(victim) for \(duration)")
                    network.pause(victim, until: scheduler.now + duration)
                default:
                    continue
                }
                ledger.report.withLock { $0.faults += 1 }
            }
        }
    }

    // MARK: Intruder

    static let intruder = "intruder"

    /// Every 0.1–0.6 s until the clients are done: one of the network's recent requests, up to three
    /// of its bytes changed, sent by a client certified for a tenant of its own to the coordinator or
    /// a worker, on a new connection. It is what a tenant with a valid certificate could try, and it
    /// opens nothing, so nothing may succeed: a reply other than an `Error` (or a status that lists no
    /// sequence) is a violation, and so is `INTERNAL` (a handler that failed on input it should have
    /// refused). What it does to the other tenants' sequences, the other invariants see.
    private func intrude(until done: @escaping @Sendable () -> Bool) async {
        let clock = SimulatedClock(scheduler: scheduler)
        let node = network.node(Self.intruder)
        let handshake = Handshake(
            local: NodeIdentity(role: .client, nodeID: Self.intruder, incarnation: 1),
            acceptedPeerRoles: [.coordinator, .worker]
        )
        let targets = ["coordinator"] + (1...settings.workers).map(workerName)
        while !done() {
            let (pause, pick, target, flips) = draw { random in
                (
                    Duration.milliseconds(100 + Int64(random.next() % 500)), random.next(), random.next(),
                    [random.next(), random.next(), random.next()]
                )
            }
            guard (try? await clock.sleep(for: pause)) != nil else { return }
            guard let body = network.recentRequest(pick).map({ Self.mutated($0, flips) })?.body, body.kind != .reply
            else { continue }
            if case .openSequence = body { continue }
            let name = targets[Int(target % UInt64(targets.count))]
            guard let address = network.address(of: name) else { continue }
            let what = Tessera_V1_Envelope(requestID: 0, body).bodyName
            let outcome: String
            do {
                outcome = try await node.withConnection(
                    to: address,
                    handshake: handshake,
                    handler: Unanswering(),
                    logger: logger(Self.intruder)
                ) { connection in
                    guard body.kind == .request else {
                        try await connection.notify(body)
                        return "one-way"
                    }
                    let reply = try await connection.request(body, timeout: .seconds(2))
                    if case .statusReply(let status) = reply, status.sequences.isEmpty { return "status" }
                    self.violate(
                        "the intruder's \(what) to \(name) was answered with \(Tessera_V1_Envelope(requestID: 0, reply).bodyName): \(body)"
                    )
                    return "answered"
                }
            } catch let error as WireError {
                // Refused, as it must be (or cut off by a fault), unless the handler failed.
                outcome = "\(error.code)"
                if error.code == .internal {
                    violate("the intruder's \(what) to \(name) failed inside the handler: \(error)")
                }
            } catch {
                outcome = "unavailable"
            }
            ledger.report.withLock { $0.intrusions[outcome, default: 0] += 1 }
        }
    }

    static let intruderWorker = "intruder-worker"

    /// A worker that holds no copy of anything (a stolen worker certificate) watches for new shard
    /// assignments and, every 1–5 ms, sends the coordinator statistics for every layer of the
    /// newly assigned shards, at their epoch, with a density of its own choosing. The coordinator
    /// keeps the first statistics per layer, so were it to take these they would set the budgets,
    /// and the decode outputs would leave the fault-free reference's; it must refuse them.
    private func forgeStatistics(until done: @escaping @Sendable () -> Bool) async {
        let clock = SimulatedClock(scheduler: scheduler)
        let node = network.node(Self.intruderWorker)
        let handshake = Handshake(
            local: NodeIdentity(role: .worker, nodeID: Self.intruderWorker, incarnation: 1),
            acceptedPeerRoles: [.coordinator]
        )
        var seen = 0
        var forged: Set<[UInt64]> = []
        while !done() {
            guard (try? await clock.sleep(for: .milliseconds(draw { 1 + Int64($0.next() % 5) }))) != nil else { return }
            let recent = network.requests(after: seen)
            seen = recent.seen
            let statistics = recent.requests.flatMap { envelope -> [Tessera_V1_LayerStats] in
                guard case .shardAssignment(let assignment) = envelope.body,
                    forged.insert([assignment.sequenceID, assignment.epoch, UInt64(assignment.shard.shardID)]).inserted
                else { return [] }
                let first = Int(assignment.shard.firstLayer)
                return (first..<first + Int(assignment.shard.layerCount)).map { layer in
                    var message = Tessera_V1_LayerStats()
                    message.sequenceID = assignment.sequenceID
                    message.epoch = assignment.epoch
                    message.layer = UInt32(layer)
                    message.promptLength = assignment.spans.map { $0.start + $0.count }.max() ?? 1
                    message.density = draw { Double($0.next() % 1_001) / 1_000 }
                    return message
                }
            }
            guard !statistics.isEmpty, let address = network.address(of: "coordinator") else { continue }
            // One-way messages: the coordinator's refusal is not answered, and the outputs show a lapse.
            let outcome: String
            do {
                try await node.withConnection(
                    to: address,
                    handshake: handshake,
                    handler: Unanswering(),
                    logger: logger(Self.intruderWorker)
                ) { connection in
                    for message in statistics { try await connection.notify(.layerStats(message)) }
                }
                outcome = "forged statistics"
            } catch {
                outcome = "unavailable"
            }
            ledger.report.withLock { $0.intrusions[outcome, default: 0] += 1 }
        }
    }

    /// `envelope` with the bytes at up to three positions flipped (each draw changes one byte three
    /// times in four); the original when the result does not parse.
    private static func mutated(_ envelope: Tessera_V1_Envelope, _ draws: [UInt64]) -> Tessera_V1_Envelope {
        guard var bytes: [UInt8] = try? envelope.serializedBytes(), !bytes.isEmpty else { return envelope }
        for draw in draws where draw % 4 != 0 {
            bytes[Int((draw >> 2) % UInt64(bytes.count))] ^= UInt8(truncatingIfNeeded: draw >> 32) | 1
        }
        return (try? Tessera_V1_Envelope(serializedBytes: bytes)) ?? envelope
    }

    // MARK: Invariants

    /// Every 100 ms: the coordinator's accounting, and what the running workers hold, within the
    /// memory limit.
    private func watchMemory(until done: @escaping @Sendable () -> Bool) async {
        let clock = SimulatedClock(scheduler: scheduler)
        let limit = settings.memoryLimitBytes
        while !done() {
            guard (try? await clock.sleep(for: .milliseconds(100))) != nil else { return }
            if let accounted = await running["coordinator"]?.coordinator?.accounted(), accounted.bytes > limit {
                let charges = accounted.sequences.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }
                violate(
                    "the coordinator accounts \(accounted.bytes) bytes, over its limit of \(limit): \(charges.joined(separator: ", "))"
                )
            }
            var held = 0
            var holders: [String] = []
            for (name, process) in runningInOrder {
                guard let copies = await process.worker?.held() else { continue }
                held += copies.bytes
                holders.append("\(name) \(copies.bytes) of \(copies.sequences)")
            }
            if held > limit {
                violate(
                    "the workers hold \(held) bytes together, over the limit of \(limit): \(holders.joined(separator: "; "))"
                )
            }
        }
    }

    // MARK: Journal

    private func draw<T>(_ body: (inout SplitMix64) -> T) -> T { random.withLock { body(&$0) } }

    private func log(_ line: String) { ledger.log(line) }

    /// A node's logger: its lines go into the trace, stamped with simulated time, at `logLevel`.
    private func logger(_ node: String) -> Logger {
        guard let level = settings.logLevel else { return Logger(label: node) { _ in SwiftLogNoOpLogHandler() } }
        let ledger = self.ledger
        var logger = Logger(label: node) { _ in TraceLogHandler(node: node, ledger: ledger) }
        logger.logLevel = level
        return logger
    }

    private func violate(_ violation: String) { ledger.violate(violation) }

    /// Polls `condition` every 50 ms of simulated time; false if it did not hold within `limit`.
    private func waitUntil(within limit: Duration, _ condition: () async -> Bool) async -> Bool {
        let clock = SimulatedClock(scheduler: scheduler)
        let deadline = clock.now.advanced(by: limit)
        while clock.now < deadline {
            if await condition() { return true }
            guard (try? await clock.sleep(for: .milliseconds(50))) != nil else { return false }
        }
        return await condition()
    }
}

/// The schedule's record: its report and trace, and the invariants checked on replies as they
/// reach their requesters.
private final class Ledger: Sendable {
    let report: Mutex<SimulationReport>
    let scheduler: Scheduler
    /// Which node acknowledged writes to a shard at an epoch (at most one may).
    private let writers = Mutex<[WriteKey: String]>([:])
    /// The newest epoch each worker accepted for each sequence (never goes back).
    private let epochs = Mutex<[EpochKey: UInt64]>([:])

    struct WriteKey: Hashable {
        var sequence: UInt64
        var shard: UInt32
        var epoch: UInt64
    }

    struct EpochKey: Hashable {
        var node: String
        var sequence: UInt64
    }

    init(seed: UInt64, scheduler: Scheduler) {
        report = Mutex(SimulationReport(seed: seed))
        self.scheduler = scheduler
    }

    func log(_ line: String) {
        let stamped = "\(Self.format(scheduler.now)) \(line)"
        report.withLock { $0.trace.append(stamped) }
    }

    func violate(_ violation: String) {
        let line = "\(Self.format(scheduler.now)) VIOLATION \(violation)"
        report.withLock {
            $0.violations.append(line)
            $0.trace.append(line)
        }
    }

    static func format(_ time: Duration) -> String {
        let millis = Int64(time / .milliseconds(1))
        let fraction = String(millis % 1000)
        return "t=\(millis / 1000).\(String(repeating: "0", count: 3 - fraction.count))\(fraction)s"
    }

    /// Checks a reply as it reaches the requester: at most one copy of a shard acknowledges a client's
    /// writes in an epoch (a replica acknowledging its primary's forward is not one), and a worker
    /// never accepts an assignment older than one it accepted.
    func check(_ request: Tessera_V1_Envelope, _ reply: Tessera_V1_Envelope, from node: String, to requester: String) {
        let fromClient = requester.hasPrefix("client-")
        switch request.body {
        case .prefill(let write) where fromClient:
            checkWriter(WriteKey(sequence: write.sequenceID, shard: write.shardID, epoch: write.epoch), node)
        case .decode(let write) where fromClient:
            checkWriter(WriteKey(sequence: write.sequenceID, shard: write.shardID, epoch: write.epoch), node)
        case .shardAssignment(let assignment):
            let key = EpochKey(node: node, sequence: assignment.sequenceID)
            let previous = epochs.withLock { epochs in
                defer { epochs[key] = max(epochs[key] ?? 0, assignment.epoch) }
                return epochs[key]
            }
            if let previous, assignment.epoch < previous {
                violate(
                    "\(node) accepted epoch \(assignment.epoch) of sequence \(assignment.sequenceID) after epoch \(previous)"
                )
            }
        default:
            break
        }
    }

    private func checkWriter(_ key: WriteKey, _ node: String) {
        let first = writers.withLock { writers in
            if writers[key] == nil { writers[key] = node }
            return writers[key]!
        }
        if first != node {
            violate(
                "\(first) and \(node) both acknowledged writes to shard \(key.shard) of sequence \(key.sequence) in epoch \(key.epoch)"
            )
        }
    }

}

/// A flag one task raises and others read.
private final class Flag: Sendable {
    private let raised = Atomic(false)

    var isRaised: Bool { raised.load(ordering: .relaxed) }

    func raise() { raised.store(true, ordering: .relaxed) }
}

/// Writes a node's log lines into the schedule's trace.
private struct TraceLogHandler: LogHandler {
    let node: String
    let ledger: Ledger
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .info

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let all = metadata.merging(event.metadata ?? [:]) { $1 }.filter { $0.key != "node.id" && $0.key != "node.role" }
        let fields = all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        ledger.log("[\(node)] \(event.level): \(event.message)\(fields.isEmpty ? "" : " " + fields)")
    }
}

/// Answers nothing the peer asks: the intruder serves no requests.
private struct Unanswering: EnvelopeHandler {
    func handle(
        _ request: Tessera_V1_Envelope,
        from connection: PeerConnection
    ) async throws -> Tessera_V1_Envelope.OneOf_Body? {
        nil
    }
}

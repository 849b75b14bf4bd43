import ClusterSecurity
import ClusterTransport
import ClusterWire
import Logging
import Synchronization
import Testing

/// `FaultPlan` parsing and decisions without I/O, then `FaultInjectionHandler` on real loopback
/// connections made with `Transport` on port 0.
@Suite struct FaultInjectionTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    // MARK: Parsing

    @Test(arguments: [
        "none",
        "drop=0.1",
        "drop=0.1,delay=5ms..20ms,corrupt=0.01,close-after=100,peer=worker-2,direction=outbound,seed=7",
        "duplicate=1,reorder=0.5,delay=250us",
        "delay=0ns..2s,direction=inbound,seed=18446744073709551615",
    ])
    func compactFormRoundTrips(text: String) throws {
        let plan = try FaultPlan(parsing: text)
        #expect(try FaultPlan(parsing: plan.description) == plan, "\(text) printed as \(plan)")
    }

    @Test func compactFormFields() throws {
        let plan = try FaultPlan(
            parsing: "drop=0.1,delay=5ms..20ms,corrupt=0.01,close-after=100,peer=worker-2,direction=outbound,seed=7"
        )
        #expect(
            plan
                == FaultPlan(
                    drop: 0.1,
                    corrupt: 0.01,
                    delay: Duration.milliseconds(5)...Duration.milliseconds(20),
                    closeAfterFrames: 100,
                    peer: "worker-2",
                    direction: .outbound,
                    seed: 7
                )
        )
        #expect(
            plan.description
                == "drop=0.1,corrupt=0.01,delay=5ms..20ms,close-after=100,peer=worker-2,direction=outbound,seed=7"
        )
        #expect(try FaultPlan(parsing: "delay=3ms").delay == Duration.milliseconds(3)...Duration.milliseconds(3))
        #expect(try FaultPlan(parsing: "") == .none)
        #expect(FaultPlan.none.description == "none")
        #expect(FaultPlan.none.isIdentity)
    }

    @Test(arguments: [
        ("drop=2", ["drop=2", "0...1"]),
        ("corrupt=lots", ["corrupt=lots", "probability"]),
        ("jitter=5ms", ["'jitter'", "drop, duplicate, reorder, corrupt, delay, close-after, peer, direction, seed"]),
        ("drop", ["'drop'", "key=value"]),
        ("drop=0.1,drop=0.2", ["'drop'", "more than once"]),
        ("delay=5", ["delay=5", "ns, us, ms or s"]),
        ("delay=-5ms", ["delay=-5ms", "not negative"]),
        ("delay=20ms..5ms", ["delay=20ms..5ms", "lower bound"]),
        ("close-after=0", ["close-after=0", ">= 1"]),
        ("direction=sideways", ["direction=sideways", "inbound, outbound, both"]),
        ("seed=-1", ["seed=-1", "whole number"]),
        ("peer=", ["peer=", "node id"]),
    ])
    func badCompactFormsNameTheKey(text: String, mentions: [String]) {
        do {
            let plan = try FaultPlan(parsing: text)
            Issue.record("'\(text)' parsed as \(plan)")
        } catch {
            #expect(error.code == .badRequest)
            for word in mentions {
                #expect(error.message.contains(word), "'\(text)': \(error.message)")
            }
        }
    }

    @Test func validationRejectsOutOfRangePlans() throws {
        let bad = [
            FaultPlan(drop: .nan), FaultPlan(reorder: -0.1), FaultPlan(duplicate: 1.5),
            FaultPlan(delay: Duration.milliseconds(-1)...Duration.zero), FaultPlan(closeAfterFrames: 0),
            FaultPlan(peer: ""),
        ]
        for plan in bad {
            #expect(throws: WireError.self, "\(plan)") { try plan.validate() }
        }
        let injector = try FaultInjector(FaultPlan(drop: 0.5))
        #expect(throws: WireError.self) { try injector.update(FaultPlan(corrupt: 2)) }
        #expect(injector.plan == FaultPlan(drop: 0.5), "a rejected update keeps the plan")
    }

    // MARK: Decisions

    @Test(arguments: [UInt64(1), 7, 0xDEAD_BEEF])
    func sameSeedGivesSameFaults(seed: UInt64) {
        let plan = FaultPlan(
            drop: 0.3,
            duplicate: 0.1,
            reorder: 0.1,
            corrupt: 0.05,
            delay: Duration.milliseconds(1)...Duration.milliseconds(9),
            seed: seed
        )
        let faults = (0..<1000).map { plan.fault(direction: .inbound, frame: $0) }
        #expect(faults == (0..<1000).map { plan.fault(direction: .inbound, frame: $0) }, "seed \(seed)")

        let dropped = faults.indices.filter { faults[$0].drop }
        // 1000 draws at p = 0.3: mean 300, standard deviation about 14.5.
        #expect((240...360).contains(dropped.count), "seed \(seed): \(dropped.count) drops")
        var other = plan
        other.seed = seed &+ 1
        #expect(dropped != (0..<1000).filter { other.fault(direction: .inbound, frame: $0).drop }, "seed \(seed)")
        #expect(dropped != (0..<1000).filter { plan.fault(direction: .outbound, frame: $0).drop }, "seed \(seed)")

        for fault in faults where !fault.drop {
            #expect(fault.delay >= .milliseconds(1) && fault.delay <= .milliseconds(9), "seed \(seed)")
            if let tag = fault.corruptTag {
                #expect(tag & 7 >= 6 && tag >> 3 >= 1, "seed \(seed): tag \(tag) must have an invalid wire type")
            }
        }
        // Changing one probability leaves the other faults where they were.
        var lessDrop = plan
        lessDrop.drop = 0
        let kept = (0..<1000).map { lessDrop.fault(direction: .inbound, frame: $0) }
        for index in 0..<1000 where !faults[index].drop {
            #expect(kept[index] == faults[index], "seed \(seed), frame \(index)")
        }
    }

    @Test func certainAndImpossibleFaults() {
        let always = FaultPlan(duplicate: 1, corrupt: 1, seed: 3)
        let never = FaultPlan(drop: 0, seed: 3)
        for index in 0..<500 {
            let fault = always.fault(direction: .outbound, frame: index)
            #expect(fault.duplicate && fault.corruptTag != nil && !fault.drop, "seed 3, frame \(index)")
            #expect(never.fault(direction: .outbound, frame: index) == FrameFault(), "seed 3, frame \(index)")
        }
    }

    // MARK: On connections

    @Test(.timeLimit(.minutes(1)))
    func droppedRepliesTimeOutAndTheConnectionRecovers() async throws {
        let seed: UInt64 = 11
        let faults = try FaultInjector(FaultPlan(drop: 1, direction: .outbound, seed: seed))
        try await Self.withServer(faults: faults) { port, received in
            try await Self.withClient(port: port) { connection, _ in
                let error = try await #require(throws: WireError.self, "seed \(seed)") {
                    try await connection.request(Self.heartbeat(1), timeout: .milliseconds(300))
                }
                #expect(error.code == .unavailable, "seed \(seed): \(error)")
                var requests = received.makeAsyncIterator()
                #expect(await requests.next()?.sequenceNumber == 1, "the request arrived; its reply was dropped")

                try faults.update(.none)
                let reply = try await connection.request(Self.heartbeat(2), timeout: .seconds(20))
                #expect(reply == Self.heartbeatAck(2), "seed \(seed)")
            }
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func corruptFramesAreRejectedAsMalformed() async throws {
        let seed: UInt64 = 12
        let faults = try FaultInjector(FaultPlan(corrupt: 1, direction: .outbound, seed: seed))
        try await Self.withServer(faults: nil) { port, _ in
            try await Self.withClient(port: port, faults: faults) { connection, _ in
                // Before closing, the server said why; the request fails with that reason.
                let error = try await #require(throws: WireError.self, "seed \(seed)") {
                    try await connection.request(Self.heartbeat(1), timeout: .seconds(20))
                }
                #expect(
                    error.code == .unavailable && error.message.contains("MALFORMED_FRAME"),
                    "seed \(seed): \(error)"
                )
            }
            // The server is still up and serves a clean connection.
            try await Self.withClient(port: port) { connection, _ in
                let reply = try await connection.request(Self.heartbeat(2))
                #expect(reply == Self.heartbeatAck(2), "seed \(seed)")
            }
        }
    }

    /// Counting the server's inbound frames, the third request is delivered and the connection closes
    /// before it is answered; counting its outbound frames, the third reply is the last frame sent.
    @Test(.timeLimit(.minutes(1)), arguments: [FaultPlan.Direction.inbound, .outbound])
    func closeAfterThreeFrames(direction: FaultPlan.Direction) async throws {
        let seed: UInt64 = 13
        let faults = try FaultInjector(FaultPlan(closeAfterFrames: 3, direction: direction, seed: seed))
        let answered: UInt64 = direction == .inbound ? 2 : 3
        try await Self.withServer(faults: faults) { port, received in
            try await Self.withClient(port: port) { connection, _ in
                for number in 1...answered {
                    let reply = try await connection.request(Self.heartbeat(number), timeout: .seconds(20))
                    #expect(reply == Self.heartbeatAck(number), "seed \(seed), \(direction)")
                }
                let error = try await #require(throws: WireError.self, "seed \(seed), \(direction)") {
                    try await connection.request(Self.heartbeat(answered + 1), timeout: .seconds(20))
                }
                #expect(error.code == .unavailable, "seed \(seed), \(direction): \(error)")
                await #expect(throws: WireError.self, "seed \(seed), \(direction): the connection stays closed") {
                    try await connection.request(Self.heartbeat(9))
                }
            }
            var requests = received.makeAsyncIterator()
            var numbers: [UInt64] = []
            for _ in 0..<3 { numbers.append(try #require(await requests.next()).sequenceNumber) }
            #expect(numbers.sorted() == [1, 2, 3], "seed \(seed), \(direction)")
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func peerFilterSparesOtherPeers() async throws {
        let seed: UInt64 = 16
        let faults = try FaultInjector(FaultPlan(drop: 1, peer: "worker-9", seed: seed))
        try await Self.withServer(faults: faults) { port, _ in
            try await Self.withClient(port: port) { connection, _ in
                let reply = try await connection.request(Self.heartbeat(1), timeout: .seconds(20))
                #expect(reply == Self.heartbeatAck(1), "seed \(seed): client-1 is not worker-9")
                try faults.update(FaultPlan(drop: 1, peer: "client-1", seed: seed))
                await #expect(throws: WireError.self, "seed \(seed): client-1's frames are dropped now") {
                    try await connection.request(Self.heartbeat(2), timeout: .milliseconds(300))
                }
            }
        }
    }

    /// Every frame is delivered twice, yet the handler gets each request once and one answer goes
    /// back: the connection drops a request id it already carried (and says so).
    @Test(.timeLimit(.minutes(1)))
    func duplicatedFramesReachTheHandlerOnce() async throws {
        let seed: UInt64 = 14
        let faults = try FaultInjector(FaultPlan(duplicate: 1, direction: .inbound, seed: seed))
        let warnings = CapturedLog()
        try await Self.withServer(faults: faults, logger: warnings.logger) { port, received in
            try await Self.withClient(port: port) { connection, _ in
                // Status requests as one-way messages: a kind no other test repeats, so the warning
                // (rate-limited per kind, process-wide) is this test's.
                for _ in 1...3 { try await connection.notify(.statusRequest(Tessera_V1_StatusRequest())) }
                // In order on the connection: once this is answered, every repeat before it was seen.
                let reply = try await connection.request(Self.heartbeat(1), timeout: .seconds(20))
                #expect(reply == Self.heartbeatAck(1), "seed \(seed)")
                var requests = received.makeAsyncIterator()
                var ids: [UInt64] = []
                for _ in 0..<4 { ids.append(try #require(await requests.next()).requestID) }
                #expect(Set(ids).count == 4, "seed \(seed): \(ids)")
            }
        }
        #expect(
            warnings.messages.contains { $0.contains("repeats one this connection already carried") },
            "seed \(seed): no repeat was dropped, so none was injected"
        )
    }

    /// One-way messages sent as a batch (one write for all: a shard's layer statistics) each arrive as
    /// a message of its own, numbered in the order given.
    @Test(.timeLimit(.minutes(1)))
    func aBatchOfOneWayMessagesArrivesAsItsMessages() async throws {
        try await Self.withServer(faults: nil) { port, received in
            try await Self.withClient(port: port) { connection, _ in
                try await connection.notify(
                    (0..<5).map { layer in
                        var statistics = Tessera_V1_LayerStats()
                        statistics.layer = UInt32(layer)
                        return .layerStats(statistics)
                    }
                )
                // Answered after the batch, which came before it on the connection.
                let reply = try await connection.request(Self.heartbeat(1), timeout: .seconds(20))
                #expect(reply == Self.heartbeatAck(1))
                var requests = received.makeAsyncIterator()
                var batch: [(id: UInt64, layer: UInt32)] = []
                for _ in 0..<6 {
                    let envelope = try #require(await requests.next())
                    if case .layerStats(let statistics) = envelope.body {
                        batch.append((envelope.requestID, statistics.layer))
                    }
                }
                batch.sort { $0.id < $1.id }
                #expect(batch.map(\.layer) == [0, 1, 2, 3, 4])
                #expect(zip(batch, batch.dropFirst()).allSatisfy { $1.id == $0.id + 2 }, "\(batch)")
            }
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func delayedAndReorderedFramesAllArrive() async throws {
        let seed: UInt64 = 15
        // reorder=1 swaps frames in pairs, so an even number of requests and of replies all arrive.
        let faults = try FaultInjector(
            FaultPlan(reorder: 1, delay: Duration.milliseconds(20)...Duration.milliseconds(40), seed: seed)
        )
        try await Self.withServer(faults: faults) { port, _ in
            try await Self.withClient(port: port) { connection, _ in
                let start = ContinuousClock.now
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for number in UInt64(1)...10 {
                        group.addTask {
                            let reply = try await connection.request(Self.heartbeat(number), timeout: .seconds(20))
                            #expect(reply == Self.heartbeatAck(number), "seed \(seed)")
                        }
                    }
                    try await group.waitForAll()
                }
                #expect(ContinuousClock.now - start >= .milliseconds(20), "seed \(seed): replies were delayed")
            }
        }
    }

    // MARK: Helpers

    static func heartbeat(_ number: UInt64) -> Tessera_V1_Envelope.OneOf_Body {
        var beat = Tessera_V1_Heartbeat()
        beat.sequenceNumber = number
        return .heartbeat(beat)
    }

    static func heartbeatAck(_ number: UInt64) -> Tessera_V1_Envelope.OneOf_Body {
        var ack = Tessera_V1_HeartbeatAck()
        ack.sequenceNumber = number
        return .heartbeatAck(ack)
    }

    /// Reports every envelope it is handed and answers heartbeats.
    struct RecordingHandler: EnvelopeHandler {
        let received: AsyncStream<Tessera_V1_Envelope>.Continuation

        func handle(
            _ request: Tessera_V1_Envelope,
            from connection: PeerConnection
        ) async throws -> Tessera_V1_Envelope.OneOf_Body? {
            received.yield(request)
            guard case .heartbeat(let beat) = request.body else { return nil }
            return FaultInjectionTests.heartbeatAck(beat.sequenceNumber)
        }
    }

    /// Runs a listener on port 0 with `faults` while `body` runs; `body` gets the port and the
    /// envelopes the server's handler was handed.
    static func withServer(
        faults: FaultInjector?,
        logger: Logger = logger,
        _ body: @Sendable (_ port: Int, _ received: AsyncStream<Tessera_V1_Envelope>) async throws -> Void
    ) async throws {
        let (received, receivedContinuation) = AsyncStream.makeStream(of: Tessera_V1_Envelope.self)
        let (ports, portContinuation) = AsyncStream.makeStream(of: Int.self)
        let handshake = Handshake(local: NodeIdentity(role: .worker, nodeID: "server-1", incarnation: 1))
        try await withThrowingTaskGroup(of: Void.self) { group in
            defer { group.cancelAll() }
            group.addTask {
                try await Transport.listen(
                    on: NodeAddress(host: "127.0.0.1", port: 0),
                    handshake: handshake,
                    security: .insecure,
                    maxFrameBytes: 1 << 20,
                    handler: RecordingHandler(received: receivedContinuation),
                    logger: logger,
                    faults: faults,
                    onBound: { portContinuation.yield($0) }
                )
            }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            try await body(port, received)
        }
    }

    /// Connects to `port` with `faults`; `body` gets the connection and the envelopes the client's
    /// handler was handed (frames from the server that answer none of our requests).
    static func withClient(
        port: Int,
        faults: FaultInjector? = nil,
        _ body: @escaping @Sendable (PeerConnection, AsyncStream<Tessera_V1_Envelope>) async throws -> Void
    ) async throws {
        let (received, continuation) = AsyncStream.makeStream(of: Tessera_V1_Envelope.self)
        let handshake = Handshake(local: NodeIdentity(role: .client, nodeID: "client-1", incarnation: 1))
        try await Transport.withConnection(
            to: NodeAddress(host: "127.0.0.1", port: port),
            handshake: handshake,
            security: .insecure,
            maxFrameBytes: 1 << 20,
            handler: RecordingHandler(received: continuation),
            logger: logger,
            faults: faults
        ) { connection in
            try await body(connection, received)
        }
    }
}

extension Tessera_V1_Envelope {
    /// The heartbeat number of a heartbeat request, else 0.
    fileprivate var sequenceNumber: UInt64 {
        if case .heartbeat(let beat) = body { return beat.sequenceNumber }
        return 0
    }
}

/// Keeps the messages logged through `logger`, at warning and above.
final class CapturedLog: Sendable {
    private let lines = Mutex<[String]>([])

    var messages: [String] { lines.withLock { $0 } }

    var logger: Logger {
        Logger(label: "captured") { _ in Handler(log: self) }
    }

    private struct Handler: LogHandler {
        let log: CapturedLog
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .warning

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            log.lines.withLock { $0.append("\(event.message)") }
        }
    }
}

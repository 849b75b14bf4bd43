import ArgumentParser
import Client
import ClusterLauncher
import ClusterSecurity
import ClusterTransport
import ClusterWire
import FoundationEssentials
import KVCacheCore
import Logging
import NIOCore
import Workloads

struct BenchWire: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-wire",
        abstract: "Measure prefill ingest and decode round trips of a local cluster against plain TCP.",
        discussion: """
            Run in release: swift build -c release --product tessera, then \
            .build/release/tessera bench-wire. Starts a coordinator and --workers workers \
            from this binary on 127.0.0.1 and measures, in the same run:

            Prefill ingest into one worker: inline-tensor frames of 64 KiB, 256 KiB, \
            1 MiB and 4 MiB (one layer of 2 KV heads x 32 dims, float32, as long a prompt \
            as fills the frame; policy full, no queries), with --in-flight requests in \
            flight on one connection (default 1 and 4), sent two ways: each frame the \
            whole prefill of a one-layer sequence (its statistics, budget and \
            compression per frame), and, on a one-worker cluster, one sequence's \
            prefill in parts, a layer per frame (64 layers a sequence, 16 for 4 MiB; \
            statistics and budget once per sequence, as TesseraClient sends a prompt). \
            MB/s of tensor payload over the time the prefill requests took; opening \
            and closing the sequences through the coordinator is not timed. The \
            worker's share: decoding the frame, checking every element, the policy's \
            (empty) profile and the layer statistics.

            Plain TCP over loopback with the same payload bytes in the same frame sizes \
            (as many frames as the one-in-flight run sent, repeated until 0.5 s, or \
            --seconds-per-point if shorter, were timed): blocking sockets streaming to a \
            sink, and one frame in flight with a one-byte ack per frame.

            CPU time per frame over the same timed requests (Linux): this process as the \
            client, the worker and the coordinator (which gets the worker's layer \
            statistics); for plain TCP, its sending and receiving threads. Where a rate \
            falls short while the CPU time per frame is small, the requests waited \
            (for the scheduler, for the other side), not worked.

            Decode round trips on 1 and on 8 concurrent clients, each with its own \
            connections and sequences (tiny, image-qa synthetic prefill, snapkv 0.2):
            real steps, then retries of the last step, which the worker answers from its \
            cache without running attention.

            Prints a table and lines like \
            `ingest 1 MiB frames: 812.3 MB/s (plain TCP 1510.2 MB/s, 54%)`; MB is 10^6 \
            bytes. Progress goes to stderr. Every child process is stopped at the end.
            """
    )

    @Option(
        help: ArgumentHelp(
            "Worker processes in the local cluster, in 1...64 (ingest always goes to one of them).",
            valueName: "n"
        )
    )
    var workers = 1

    @Option(help: ArgumentHelp("Seconds measured for each figure, in 0.1...60.", valueName: "seconds"))
    var secondsPerPoint = 2.0

    @Option(
        help: ArgumentHelp(
            "Prefill requests kept in flight on the ingest connection, one figure each: a comma-separated "
                + "list of values in 1...64.",
            valueName: "n,n,..."
        )
    )
    var inFlight = "1,4"

    @Option(
        help: ArgumentHelp(
            "Also write the figures as JSON to this path (an array: one report per security mode run).",
            valueName: "path"
        )
    )
    var json: String?

    @Option(
        help: ArgumentHelp(
            "How the cluster's connections run: tls (mutual TLS, a throw-away CA), insecure (plaintext), or both, "
                + "one after the other, with what TLS costs against plaintext.",
            valueName: "tls|insecure|both"
        )
    )
    var security = "tls"

    func run() async throws {
        guard (1...64).contains(workers) else { throw usageFailure("--workers must be in 1...64, got \(workers)") }
        guard secondsPerPoint.isFinite, (0.1...60).contains(secondsPerPoint) else {
            throw usageFailure("--seconds-per-point must be in 0.1...60, got \(secondsPerPoint)")
        }
        let logger = Logger(label: "tessera") { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = .error
            return handler
        }
        let windows = inFlight.split(separator: ",", omittingEmptySubsequences: false).map {
            Int($0.filter { $0 != " " })
        }
        guard !windows.isEmpty, windows.allSatisfy({ $0.map { (1...64).contains($0) } ?? false }) else {
            throw usageFailure("--in-flight must be a comma-separated list of values in 1...64, got '\(inFlight)'")
        }
        let workers = workers
        let seconds = secondsPerPoint
        progress("starting a coordinator and \(workers) worker(s) from \(LocalCluster.currentBinary)")
        let modes: [Bool]
        switch security {
        case "tls": modes = [false]
        case "insecure": modes = [true]
        case "both": modes = [true, false]
        default: throw usageFailure("--security must be tls, insecure or both, got '\(security)'")
        }
        var reports: [WireBenchmark.Report] = []
        for insecure in modes {
            let mode = insecure ? "insecure" : "mutual TLS"
            progress("connections: \(insecure ? "plaintext (insecure)" : "mutual TLS with a throw-away CA")")
            reports.append(
                try await WireBenchmark.withCluster(
                    workers: workers,
                    security: insecure ? .insecure : .throwawayCA,
                    logger: logger
                ) { cluster in
                    let ingest = try await IngestBenchmark.run(
                        cluster: cluster,
                        windows: windows.compactMap { $0 },
                        seconds: seconds,
                        logger: logger
                    )
                    let decode = try await DecodeBenchmark.run(cluster: cluster, seconds: seconds, logger: logger)
                    return WireBenchmark.Report(
                        security: mode,
                        workers: workers,
                        secondsPerPoint: seconds,
                        onlineProcessors: Terminal.onlineProcessors,
                        ingest: ingest,
                        decode: decode
                    )
                }
            )
            progress("every child process stopped")
        }
        Terminal.output(reports.map(BenchWireOutput.render).joined(separator: "\n"))
        if reports.count == 2 { Terminal.output("\n" + BenchWireOutput.compare(tls: reports[1], insecure: reports[0])) }
        if let json { try BenchWireOutput.write(reports, to: json) }
    }
}

private func progress(_ text: String) { Terminal.error("[tessera] bench-wire: \(text)\n") }

/// The tenant every benchmark sequence belongs to.
private let benchTenant = "bench-wire"

// MARK: - Prefill ingest

/// Prefill with inline tensors straight to the worker that holds the sequence: opening and closing go
/// through `TesseraClient` (the coordinator), the prefill itself over one connection of our own to the
/// worker, which is what `TesseraClient` would do for a one-shard sequence (it only sends seeds).
private enum IngestBenchmark {
    static let frameSizes = [64 << 10, 256 << 10, 1 << 20, 4 << 20]

    /// The tiny model's heads (2 KV heads × 32 dims) in `layers` layers. A one-layer sequence is one
    /// shard with one layer, so its prefill is one frame carrying exactly one layer's `LayerTensors`;
    /// a sequence of more layers, on a cluster of one worker, is one shard whose prefill can go in
    /// parts, a layer per frame.
    static func geometry(layers: Int = 1) throws -> ModelGeometry {
        try ModelGeometry(
            name: "tiny-\(layers)-layer",
            layers: layers,
            queryHeads: 4,
            kvHeads: 2,
            headDim: 32,
            tokensPerImage: 64
        )
    }

    /// How the frames of a measurement make up sequences.
    enum Shape {
        /// Each frame is the whole prefill of a one-layer sequence: every frame also costs that
        /// sequence's layer statistics and its budget, as many small prompts would.
        case sequencePerFrame
        /// A batch's frames are the parts of one sequence's prefill, a layer each, as a client
        /// streams a long prompt: the statistics and the budget come once, after the last part.
        case oneSequenceInParts
    }

    static func run(
        cluster: LocalCluster,
        windows: [Int],
        seconds: Double,
        logger: Logger
    ) async throws -> [WireBenchmark.IngestPoint] {
        let security = try cluster.clientSecurity(name: "bench-wire-ingest", tenant: benchTenant)
        return try await TesseraClient.withClient(
            coordinator: cluster.coordinator,
            security: security,
            tenant: benchTenant,
            nodeID: "bench-wire-ingest",
            logger: logger
        ) { client in
            // Where one-layer sequences land: every one goes to the first shard's primary.
            let geometry = try geometry()
            let probe = try await client.openSequence(
                1,
                geometry: geometry,
                layout: try PromptLayout(spans: [ModalitySpan(.text, start: 0, count: 1)]),
                policy: .full,
                retention: 1
            )
            _ = try await client.close(1)
            guard probe.shards.count == 1 else {
                throw BenchWireError("a one-layer sequence was placed on \(probe.shards.count) shards")
            }
            let worker = probe.shards[0].primary
            // For the CPU time each process spends on the timed requests (not when run on hosts).
            let pids = cluster.workers.first { $0.address == worker }.map { ($0.pid, cluster.coordinatorPID) }
            let handshake = Handshake(
                local: NodeIdentity(role: .client, nodeID: "bench-wire-ingest", incarnation: 1),
                acceptedPeerRoles: [.worker]
            )
            return try await Transport.withConnection(
                to: worker,
                handshake: handshake,
                security: security,
                maxFrameBytes: 64 << 20,
                handler: RefuseEveryRequest(),
                logger: logger
            ) { connection in
                var points: [WireBenchmark.IngestPoint] = []
                var nextID: UInt64 = 2
                // A sequence's layers stay on one shard only when there is one worker.
                let shapes: [Shape] =
                    cluster.workers.count == 1 ? [.sequencePerFrame, .oneSequenceInParts] : [.sequencePerFrame]
                for size in frameSizes {
                    let frame = try InlineFrame(payloadBytes: size, geometry: geometry)
                    var rates: [WireBenchmark.IngestRate] = []
                    var inParts: [WireBenchmark.IngestRate] = []
                    for shape in shapes {
                        for window in windows {
                            progress(
                                "ingest \(frameLabel(size)) frames (\(frame.promptLength) positions), "
                                    + (shape == .sequencePerFrame
                                        ? "a sequence each" : "one sequence's prefill in parts")
                                    + ", \(window) in flight for \(seconds) s"
                            )
                            let rate = try await measure(
                                frame,
                                shape: shape,
                                window: window,
                                seconds: seconds,
                                client: client,
                                connection: connection,
                                worker: worker,
                                pids: pids,
                                nextID: &nextID
                            )
                            if shape == .sequencePerFrame { rates.append(rate) } else { inParts.append(rate) }
                        }
                    }
                    let frames = rates[0].frames
                    progress("plain TCP: \(frames) frames of \(frameLabel(size)), streamed and then acked one by one")
                    // The same bytes once, or repeated until 0.5 s (at most the point's seconds) were timed.
                    let minimum = min(0.5, seconds)
                    let stream = try await WireBenchmark.plainTCP(
                        frameBytes: size,
                        frames: frames,
                        ackEveryFrame: false,
                        minimumSeconds: minimum
                    )
                    let acked = try await WireBenchmark.plainTCP(
                        frameBytes: size,
                        frames: frames,
                        ackEveryFrame: true,
                        minimumSeconds: minimum
                    )
                    points.append(
                        WireBenchmark.IngestPoint(
                            payloadBytesPerFrame: size,
                            wireBytesPerFrame: frame.wireBytes,
                            promptLength: frame.promptLength,
                            tessera: rates,
                            inParts: inParts,
                            plainTCP: stream,
                            plainTCPAcked: acked
                        )
                    )
                }
                return points
            }
        }
    }

    /// Prefills batches of fresh sequences until the prefill requests have taken `seconds`. Each batch
    /// is opened (untimed), prefilled with `window` requests in flight (timed), then closed (untimed),
    /// so the worker holds at most one batch (≤ 64 MiB) at a time.
    static func measure(
        _ frame: InlineFrame,
        shape: Shape,
        window: Int,
        seconds: Double,
        client: TesseraClient,
        connection: PeerConnection,
        worker: NodeAddress,
        pids: (worker: Int32, coordinator: Int32)?,
        nextID: inout UInt64
    ) async throws -> WireBenchmark.IngestRate {
        let batch = max(4, min(64, (64 << 20) / frame.payloadBytes))
        let clock = ContinuousClock()
        var elapsed = Duration.zero
        var frames = 0
        var latencies: [Duration] = []
        var cpu: WireBenchmark.ProcessesCPU? = WireBenchmark.ProcessesCPU(client: 0, worker: 0, coordinator: 0)
        let layers = shape == .sequencePerFrame ? 1 : batch
        let geometry = try geometry(layers: layers)
        while elapsed < .seconds(seconds) {
            var messages: [Tessera_V1_Prefill] = []
            var sequences: [UInt64] = []
            for _ in 0..<(batch / layers) {
                let id = nextID
                nextID += 1
                let placement = try await client.openSequence(
                    id,
                    geometry: geometry,
                    layout: frame.layout,
                    policy: .full,
                    retention: 1
                )
                sequences.append(placement.sequenceID)
                guard placement.shards.count == 1, placement.shards[0].primary == worker else {
                    throw BenchWireError("sequence \(id) was placed elsewhere than \(worker): \(placement.shards)")
                }
                for layer in 0..<layers {
                    messages.append(
                        frame.prefill(
                            sequenceID: placement.sequenceID,
                            shardID: placement.shards[0].id,
                            epoch: placement.epoch,
                            layer: layer
                        )
                    )
                }
            }
            let cpuBefore = pids.flatMap {
                WireBenchmark.ProcessesCPU.now(worker: $0.worker, coordinator: $0.coordinator)
            }
            let start = clock.now
            latencies += try await send(messages, window: window, over: connection)
            elapsed += clock.now - start
            let cpuAfter = pids.flatMap {
                WireBenchmark.ProcessesCPU.now(worker: $0.worker, coordinator: $0.coordinator)
            }
            cpu = WireBenchmark.combined(cpu, WireBenchmark.combined(cpuAfter, cpuBefore, -), +)
            frames += batch
            for sequence in sequences { _ = try await client.close(sequence) }
        }
        return WireBenchmark.IngestRate(
            inFlight: window,
            frames: frames,
            payloadBytes: frames * frame.payloadBytes,
            seconds: elapsed.inSeconds,
            latency: WireBenchmark.Latency(latencies),
            cpuSeconds: cpu
        )
    }

    /// Sends the prefills keeping `window` in flight; returns each one's time until its ack.
    static func send(
        _ messages: [Tessera_V1_Prefill],
        window: Int,
        over connection: PeerConnection
    ) async throws
        -> [Duration]
    {
        @Sendable func prefill(_ message: Tessera_V1_Prefill) async throws -> Duration {
            let start = ContinuousClock.now
            let reply = try await connection.request(.prefill(message), timeout: .seconds(120))
            guard case .prefillAck = reply else {
                throw BenchWireError("the worker answered a prefill with \(Tessera_V1_Envelope(reply).bodyName)")
            }
            return ContinuousClock.now - start
        }
        if window == 1 {
            var latencies: [Duration] = []
            for message in messages { latencies.append(try await prefill(message)) }
            return latencies
        }
        return try await withThrowingTaskGroup(of: Duration.self) { group in
            var latencies: [Duration] = []
            var running = 0
            for message in messages {
                if running == window, let latency = try await group.next() {
                    latencies.append(latency)
                    running -= 1
                }
                group.addTask { try await prefill(message) }
                running += 1
            }
            for try await latency in group { latencies.append(latency) }
            return latencies
        }
    }
}

/// One layer's keys and values as an inline prefill: `payloadBytes` of float32 tensor data.
private struct InlineFrame: Sendable {
    let geometry: ModelGeometry
    let layout: PromptLayout
    let promptLength: Int
    let tensors: Tessera_V1_LayerTensors
    let payloadBytes: Int
    /// The whole frame on the wire: length prefix, envelope, prefill fields, tensor headers and data.
    let wireBytes: Int

    init(payloadBytes: Int, geometry: ModelGeometry) throws {
        self.geometry = geometry
        // Keys and values: 2 × kvHeads × headDim float32 per prompt position.
        let bytesPerPosition = 2 * geometry.kvHeads * geometry.headDim * MemoryLayout<Float>.size
        promptLength = payloadBytes / bytesPerPosition
        precondition(promptLength * bytesPerPosition == payloadBytes)
        layout = try PromptLayout(spans: [ModalitySpan(.text, start: 0, count: promptLength)])
        let count = geometry.kvHeads * promptLength * geometry.headDim
        var generator = SystemRandomNumberGenerator()
        let keys = (0..<count).map { _ in Float.random(in: -1...1, using: &generator) }
        let values = (0..<count).map { _ in Float.random(in: -1...1, using: &generator) }
        tensors = try LayerPrefill(
            geometry: geometry,
            promptLength: promptLength,
            keys: keys,
            values: values,
            queries: [],
            queryRows: 0
        ).proto(layer: 0)
        self.payloadBytes = payloadBytes
        var sample = Tessera_V1_Prefill()
        sample.tenant = benchTenant
        sample.sequenceID = UInt64(Int64.max)
        sample.epoch = UInt64(Int64.max)
        sample.inlineTensors.layers = [tensors]
        wireBytes =
            try Tessera_V1_Envelope(requestID: UInt64(Int64.max), .prefill(sample)).serializedFrame()
            .readableBytes + FrameDecoder.headerBytes
    }

    /// The prefill of `layer` (a whole one-layer sequence's, or a part of a longer one's); every layer
    /// carries the same tensors, which the messages share.
    func prefill(sequenceID: UInt64, shardID: UInt32, epoch: UInt64, layer: Int) -> Tessera_V1_Prefill {
        var message = Tessera_V1_Prefill()
        message.tenant = benchTenant
        message.sequenceID = sequenceID
        message.shardID = shardID
        message.epoch = epoch
        var tensors = tensors
        tensors.layer = UInt32(layer)
        message.inlineTensors.layers = [tensors]
        return message
    }
}

/// Our connection to the worker only sends requests.
private struct RefuseEveryRequest: EnvelopeHandler {
    func handle(
        _ request: Tessera_V1_Envelope,
        from connection: PeerConnection
    ) async throws
        -> Tessera_V1_Envelope.OneOf_Body?
    {
        throw WireError(.badRequest, "the benchmark client does not accept \(request.bodyName)")
    }
}

// MARK: - Decode round trips

/// Decode steps through `TesseraClient`, one step in flight per client. A sequence's steps must run in
/// order, so concurrency comes from several clients, each in its own `withClient` scope (its own
/// connections to the coordinator and the workers) with its own sequences.
private enum DecodeBenchmark {
    static let connectionCounts = [1, 8]
    static let seed: UInt64 = 1
    static let retention = 0.2

    static func run(cluster: LocalCluster, seconds: Double, logger: Logger) async throws -> [WireBenchmark.DecodePoint]
    {
        let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: seed).sequence(0)
        let setup = Setup(
            cluster: cluster,
            logger: logger,
            layout: trace.layout,
            steps: trace.decodeSteps,
            seconds: seconds
        )

        // A pilot sequence estimates how many real steps a second holds, to prepare enough sequences.
        progress("decode pilot: one tiny image-qa sequence (\(trace.layout.promptLength) tokens), \(setup.steps) steps")
        let pilotRate = try await TesseraClient.withClient(
            coordinator: cluster.coordinator,
            security: try cluster.clientSecurity(name: "bench-wire-pilot", tenant: benchTenant),
            tenant: benchTenant,
            nodeID: "bench-wire-pilot",
            logger: logger
        ) { client in
            let id: UInt64 = 90_000_000
            try await setup.prepare(id, client: client)
            let clock = ContinuousClock()
            let start = clock.now
            for step in 0..<setup.steps { _ = try await client.decode(id, step: step, geometry: .tiny) }
            let rate = Double(setup.steps) / (clock.now - start).inSeconds
            _ = try await client.close(id)
            return rate
        }

        var points: [WireBenchmark.DecodePoint] = []
        var bestRate = pilotRate
        for (round, connections) in connectionCounts.enumerated() {
            // Sequences for twice the best single-connection rate seen so far, times min(connections,
            // cores + 1), for the whole phase: a client that runs out stops early (and is reported).
            let scale = Double(min(connections, max(1, Terminal.onlineProcessors) + 1))
            let steps = 2 * seconds * bestRate * scale
            let perClient = min(3000 / connections, Int((steps / Double(connections * setup.steps)).rounded(.up)) + 1)
            progress(
                "decode on \(connections) connection(s): preparing \(perClient) sequence(s) per connection, then "
                    + "\(seconds) s of real steps and \(seconds) s of cached retries"
            )
            let real = WireBenchmark.StartLine(parties: connections)
            let cached = WireBenchmark.StartLine(parties: connections)
            let preparing = ContinuousClock.now
            let figures = try await withThrowingTaskGroup(of: ClientFigures.self) { group in
                for index in 0..<connections {
                    let firstID = UInt64(100_000_000 * (round + 1) + 1_000_000 * index)
                    group.addTask {
                        try await setup.client(
                            index,
                            of: connections,
                            sequences: perClient,
                            firstID: firstID,
                            real: real,
                            cached: cached
                        )
                    }
                }
                var all: [ClientFigures] = []
                for try await figures in group { all.append(figures) }
                return all
            }
            progress(
                "decode on \(connections) connection(s): preparing took "
                    + "\(ResultTable.format((figures[0].realStart - preparing).inSeconds, 1)) s"
            )
            for kind in ["real", "cached"] {
                let start = kind == "real" ? figures[0].realStart : figures[0].cachedStart
                let end = figures.map { kind == "real" ? $0.realEnd : $0.cachedEnd }.max()!
                let latencies = figures.flatMap { kind == "real" ? $0.realLatencies : $0.cachedLatencies }
                points.append(
                    WireBenchmark.DecodePoint(
                        connections: connections,
                        kind: kind,
                        roundTrips: latencies.count,
                        seconds: (end - start).inSeconds,
                        latency: WireBenchmark.Latency(latencies),
                        ranOutOfSequences: kind == "real" && figures.contains(where: \.ranOut)
                    )
                )
            }
            if connections == 1, let measured = points.first(where: { $0.kind == "real" }) {
                bestRate = max(bestRate, measured.perSecond)
            }
        }
        return points
    }

    struct ClientFigures: Sendable {
        var realStart: ContinuousClock.Instant
        var realEnd: ContinuousClock.Instant
        var realLatencies: [Duration] = []
        var ranOut = false
        var cachedStart: ContinuousClock.Instant
        var cachedEnd: ContinuousClock.Instant
        var cachedLatencies: [Duration] = []
    }

    struct Setup: Sendable {
        let cluster: LocalCluster
        let logger: Logger
        let layout: PromptLayout
        let steps: Int
        let seconds: Double

        /// Opens and prefills a sequence: seed-expanded on the workers, so little crosses the wire.
        func prepare(_ id: UInt64, client: TesseraClient) async throws {
            _ = try await client.openSequence(
                id,
                geometry: .tiny,
                layout: layout,
                policy: .snapKV(SnapKVSettings()),
                retention: retention
            )
            _ = try await client.prefillSynthetic(id, workload: WorkloadPreset.imageQA.rawValue, seed: seed, index: 0)
        }

        /// One client: prepares its sequences, then at the common start runs real steps (sequence after
        /// sequence, step after step) for `seconds`, then at the next common start re-sends the last step
        /// it ran for `seconds` (the worker answers a repeated last step from its cache).
        func client(
            _ index: Int,
            of connections: Int,
            sequences: Int,
            firstID: UInt64,
            real: WireBenchmark.StartLine,
            cached: WireBenchmark.StartLine
        ) async throws -> ClientFigures {
            do {
                let name = "bench-wire-decode-\(connections)-\(index)"
                return try await TesseraClient.withClient(
                    coordinator: cluster.coordinator,
                    security: try cluster.clientSecurity(name: name, tenant: benchTenant),
                    tenant: benchTenant,
                    nodeID: name,
                    logger: logger
                ) { client in
                    let ids = (0..<sequences).map { firstID + UInt64($0) }
                    for id in ids { try await prepare(id, client: client) }
                    let clock = ContinuousClock()
                    let realStart = try await real.arrive()
                    var figures = ClientFigures(
                        realStart: realStart,
                        realEnd: realStart,
                        cachedStart: realStart,
                        cachedEnd: realStart
                    )
                    var last: (id: UInt64, step: Int)?
                    var deadline = realStart + .seconds(seconds)
                    running: for id in ids {
                        for step in 0..<steps {
                            guard clock.now < deadline else { break running }
                            let sent = clock.now
                            _ = try await client.decode(id, step: step, geometry: .tiny)
                            figures.realEnd = clock.now
                            figures.realLatencies.append(figures.realEnd - sent)
                            last = (id, step)
                        }
                    }
                    figures.ranOut = clock.now < deadline
                    guard let last else { throw BenchWireError("client \(index) ran no decode step") }
                    figures.cachedStart = try await cached.arrive()
                    figures.cachedEnd = figures.cachedStart
                    deadline = figures.cachedStart + .seconds(seconds)
                    while clock.now < deadline {
                        let sent = clock.now
                        _ = try await client.decode(last.id, step: last.step, geometry: .tiny)
                        figures.cachedEnd = clock.now
                        figures.cachedLatencies.append(figures.cachedEnd - sent)
                    }
                    for id in ids { _ = try await client.close(id) }
                    return figures
                }
            } catch {
                // The others must not wait at a start line for a client that is gone.
                real.abort(error)
                cached.abort(error)
                throw error
            }
        }
    }
}

// MARK: - Output

private enum BenchWireOutput {
    static func render(_ report: WireBenchmark.Report) -> String {
        var out =
            "bench-wire, \(report.security): \(report.workers) worker(s) over 127.0.0.1, "
            + "\(ResultTable.format(report.secondsPerPoint, 1)) s "
            + "per point, \(report.onlineProcessors) online processors; MB = 10^6 bytes of tensor payload\n\n"
        out +=
            "prefill ingest into one worker (inline float32 keys+values of one layer, 2 KV heads × 32 dims; "
            + "policy full, no queries)\n"
        var rows: [[String]] = []
        for point in report.ingest {
            var row = [
                frameLabel(point.payloadBytesPerFrame), "\(point.promptLength)", grouped(point.wireBytesPerFrame),
            ]
            row.append(grouped(point.tessera.first?.frames ?? 0))
            for rate in point.tessera {
                row.append(ResultTable.format(rate.megabytesPerSecond, 1))
                row.append(ResultTable.format(rate.latency.p50Micros / 1000, 2))
            }
            row.append(ResultTable.format(point.plainTCP.megabytesPerSecond, 1))
            row.append(ResultTable.format(point.plainTCPAcked.megabytesPerSecond, 1))
            row.append(ResultTable.format(point.percentOfPlainTCP, 0) + "%")
            rows.append(row)
        }
        let windows = report.ingest.first?.tessera.map(\.inFlight) ?? []
        var header = ["frame", "positions", "wire bytes", "frames"]
        for window in windows { header += ["\(window) in flight MB/s", "p50 ms"] }
        header += ["plain TCP MB/s", "TCP acked MB/s", "vs TCP"]
        out += "each frame the whole prefill of a one-layer sequence\n" + table(header, rows)
        if report.ingest.contains(where: { !$0.inParts.isEmpty }) {
            out += "\none sequence's prefill in parts, a layer per frame (statistics and budget once per sequence)\n"
            var header = ["frame"]
            for window in windows { header += ["\(window) in flight MB/s", "p50 ms", "vs TCP"] }
            out += table(
                header,
                report.ingest.map { point in
                    [frameLabel(point.payloadBytesPerFrame)]
                        + point.inParts.flatMap { rate in
                            [
                                ResultTable.format(rate.megabytesPerSecond, 1),
                                ResultTable.format(rate.latency.p50Micros / 1000, 2),
                                ResultTable.format(point.percent(rate), 0) + "%",
                            ]
                        }
                }
            )
            out += "\n"
        }
        for point in report.ingest {
            guard let first = point.tessera.first else { continue }
            /// "267.8 MB/s (9%)".
            func share(_ rate: WireBenchmark.IngestRate) -> String {
                "\(ResultTable.format(rate.megabytesPerSecond, 1)) MB/s (\(ResultTable.format(point.percent(rate), 0))%)"
            }
            /// "; 4 in flight 267.8 MB/s (9%)" for each rate.
            func more(_ rates: some Sequence<WireBenchmark.IngestRate>) -> String {
                rates.map { "; \($0.inFlight) in flight \(share($0))" }.joined()
            }
            var line =
                "ingest \(frameLabel(point.payloadBytesPerFrame)) frames: "
                + "\(ResultTable.format(first.megabytesPerSecond, 1)) MB/s (plain TCP "
                + "\(ResultTable.format(point.plainTCP.megabytesPerSecond, 1)) MB/s, "
                + "\(ResultTable.format(point.percentOfPlainTCP, 0))%)" + more(point.tessera.dropFirst())
            line += "; plain TCP acked per frame \(ResultTable.format(point.plainTCPAcked.megabytesPerSecond, 1)) MB/s"
            if let parts = point.inParts.first {
                line += "; in parts \(share(parts))" + more(point.inParts.dropFirst())
            }
            out += line + "\n"
        }
        out += cpuTable(report.ingest)

        out +=
            "\ndecode round trips through TesseraClient (tiny, image-qa synthetic prefill, snapkv 0.2; one step "
            + "in flight per connection; a step goes to every shard on \(report.workers) worker(s))\n"
        let decodeRows = report.decode.map { point in
            [
                "\(point.connections)", point.kind == "real" ? "real steps" : "cached retry",
                grouped(point.roundTrips), ResultTable.format(point.seconds, 2),
                grouped(Int(point.perSecond.rounded())),
                ResultTable.format(point.latency.p50Micros, 0), ResultTable.format(point.latency.p99Micros, 0),
                point.ranOutOfSequences ? "ran out of prepared sequences" : "",
            ]
        }
        out += table(
            ["connections", "kind", "round trips", "seconds", "per second", "p50 µs", "p99 µs", "note"],
            decodeRows
        )
        func rates(_ kind: String) -> String {
            report.decode.filter { $0.kind == kind }.map { point in
                "\(point.connections) connection\(point.connections == 1 ? "" : "s") "
                    + "\(grouped(Int(point.perSecond.rounded())))/s"
            }.joined(separator: "; ")
        }
        out += "decode round trips: \(rates("real")) (real steps)\n"
        out += "decode round trips, cached retry of the last step: \(rates("cached"))\n"
        return out
    }

    /// CPU µs per frame: client / worker / coordinator for each way and number in flight, both ends of
    /// plain TCP.
    static func cpuTable(_ ingest: [WireBenchmark.IngestPoint]) -> String {
        func micros(_ value: Double?) -> String { value.map { ResultTable.format($0, 0) } ?? "-" }
        func cells(_ rates: [WireBenchmark.IngestRate]) -> [String] {
            rates.map { rate in
                guard let cpu = rate.cpuMicrosPerFrame else { return "-" }
                return
                    "\(micros(cpu.total)) (\(micros(cpu.client)) / \(micros(cpu.worker)) / \(micros(cpu.coordinator)))"
            }
        }
        let rows = ingest.map { point in
            [frameLabel(point.payloadBytesPerFrame)] + cells(point.tessera) + cells(point.inParts)
                + [micros(point.plainTCP.cpuMicrosPerFrame), micros(point.plainTCPAcked.cpuMicrosPerFrame)]
        }
        var header = ["frame"] + (ingest.first?.tessera.map { "\($0.inFlight) in flight" } ?? [])
        header += ingest.first?.inParts.map { "in parts, \($0.inFlight) in flight" } ?? []
        return "\nCPU µs per frame: all (client / worker / coordinator); plain TCP: sender and sink threads\n"
            + table(header + ["plain TCP", "TCP acked"], rows)
    }

    static func table(_ header: [String], _ rows: [[String]]) -> String {
        let widths = header.indices.map { c in ([header[c]] + rows.map { $0[c] }).map(\.count).max()! }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { c, text in
                c == 0 ? text.padding(widths[c]) : String(repeating: " ", count: widths[c] - text.count) + text
            }.joined(separator: "  ").trimmed + "\n"
        }
        return line(header) + line(widths.map { String(repeating: "-", count: $0) }) + rows.map(line).joined()
    }

    /// What mutual TLS costs against plaintext, figure by figure, from two runs of one invocation.
    static func compare(tls: WireBenchmark.Report, insecure: WireBenchmark.Report) -> String {
        func change(_ secure: Double, _ plain: Double) -> String {
            plain > 0 ? (secure >= plain ? "+" : "") + ResultTable.format(100 * (secure - plain) / plain, 0) + "%" : "-"
        }
        var rows: [[String]] = []
        for (secure, plain) in zip(tls.ingest, insecure.ingest) {
            for (s, p) in zip(secure.tessera, plain.tessera) {
                rows.append([
                    "ingest \(frameLabel(secure.payloadBytesPerFrame)), \(s.inFlight) in flight", "MB/s",
                    ResultTable.format(s.megabytesPerSecond, 1), ResultTable.format(p.megabytesPerSecond, 1),
                    change(s.megabytesPerSecond, p.megabytesPerSecond),
                ])
            }
        }
        for (s, p) in zip(tls.decode, insecure.decode) {
            rows.append([
                "decode, \(s.connections) connection\(s.connections == 1 ? "" : "s"), "
                    + (s.kind == "real" ? "real steps" : "cached retry"),
                "per second", grouped(Int(s.perSecond.rounded())), grouped(Int(p.perSecond.rounded())),
                change(s.perSecond, p.perSecond),
            ])
        }
        return "mutual TLS against plaintext, same invocation (plaintext ran first):\n"
            + table(["figure", "unit", "mutual TLS", "plaintext", "change"], rows)
    }

    static func write(_ reports: [WireBenchmark.Report], to path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data = try encoder.encode(reports)
        do {
            try data.write(to: URL(filePath: path))
        } catch {
            Terminal.error("error: cannot write \(path): \(error)\n")
            throw ExitCode(1)
        }
        progress("wrote \(path)")
    }
}

/// "64 KiB", "1 MiB".
private func frameLabel(_ bytes: Int) -> String {
    bytes % (1 << 20) == 0 ? "\(bytes >> 20) MiB" : "\(bytes >> 10) KiB"
}

/// 12345 as "12,345".
private func grouped(_ value: Int) -> String {
    let digits = String(value.magnitude)
    var out = ""
    for (index, digit) in digits.enumerated() {
        if index > 0, (digits.count - index) % 3 == 0 { out += "," }
        out.append(digit)
    }
    return (value < 0 ? "-" : "") + out
}

private struct BenchWireError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

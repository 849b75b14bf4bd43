import Client
import ClusterAdmin
import ClusterSecurity
import ClusterTransport
public import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The parts of `tessera bench-wire` that need nothing of the wire protocol itself: a local cluster
/// whose workers are all registered, a plain-TCP baseline over loopback, a start line for concurrent
/// clients, latency summaries, and the figures as `Codable` values. The protocol-specific measurements
/// (inline prefill, decode round trips) live with the command, which depends on the tensor modules.
public enum WireBenchmark {
    /// `a` and `b` combined with `operation`: nil when either is, as a CPU reading that could not be
    /// taken leaves every sum and difference it enters unknown.
    public static func combined<T>(_ a: T?, _ b: T?, _ operation: (T, T) -> T) -> T? {
        guard let a, let b else { return nil }
        return operation(a, b)
    }

    /// Starts a coordinator and `workers` workers from this binary (children log errors only, to this
    /// process's stderr), waits until every worker is alive in the coordinator's view, runs `body`,
    /// and stops every child when it returns or throws.
    public static func withCluster<T: Sendable>(
        workers: Int,
        security: LocalCluster.Security,
        logger: Logger,
        _ body: @escaping @Sendable (LocalCluster) async throws -> T
    ) async throws -> T {
        var options = LocalCluster.Options(
            binary: LocalCluster.currentBinary,
            workers: workers,
            childArguments: ["--log-level", "error"],
            inheritStandardError: true
        )
        options.security = security
        return try await LocalCluster.withCluster(options, logger: logger) { cluster in
            try await TesseraClient.withClient(
                coordinator: cluster.coordinator,
                security: try cluster.clientSecurity(name: "bench-wire-probe", tenant: "bench-wire"),
                nodeID: "bench-wire-probe",
                logger: logger
            ) { client in
                let clock = ContinuousClock()
                let deadline = clock.now + .seconds(30)
                while try await client.status().workers.filter({ $0.state == "alive" }).count < workers {
                    guard clock.now < deadline else {
                        throw LaunchError("the \(workers) worker(s) did not all register within 30 s")
                    }
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
            return try await body(cluster)
        }
    }

    // MARK: - Plain TCP baseline

    /// Plain-TCP transfers over loopback: `passes` times the same frames, each on a new connection.
    public struct Transfer: Sendable, Codable, Hashable {
        /// Payload bytes the sink received, over all passes.
        public var bytes: Int
        /// Frames per pass.
        public var frames: Int
        public var passes: Int
        /// Summed over the passes, each from its first write until the sink's final byte came back.
        public var seconds: Double
        /// Whether the sink answered every frame with one byte before the next was sent.
        public var ackEveryFrame: Bool
        /// Decimal megabytes (10^6 bytes) per second.
        public var megabytesPerSecond: Double
        /// CPU time of both ends (the sending and the receiving thread) per frame, in microseconds;
        /// nil where threads' CPU time cannot be read.
        public var cpuMicrosPerFrame: Double?

        public init(bytes: Int, frames: Int, passes: Int, seconds: Double, ackEveryFrame: Bool, cpuSeconds: Double?) {
            self.bytes = bytes
            self.frames = frames
            self.passes = passes
            self.seconds = seconds
            self.ackEveryFrame = ackEveryFrame
            megabytesPerSecond = seconds > 0 ? Double(bytes) / seconds / 1e6 : 0
            cpuMicrosPerFrame = cpuSeconds.map { 1e6 * $0 / Double(max(1, frames * passes)) }
        }
    }

    /// Transfers `frames` frames of `frameBytes` bytes as `transfer(frameBytes:frames:ackEveryFrame:)`
    /// does, repeating the whole transfer until the passes took `minimumSeconds` together: the same
    /// bytes a tessera measurement moved may take plain TCP only milliseconds, too short to time alone.
    public static func plainTCP(
        frameBytes: Int,
        frames: Int,
        ackEveryFrame: Bool,
        minimumSeconds: Double
    )
        async throws -> Transfer
    {
        var bytes = 0
        var seconds = 0.0
        var cpuSeconds: Double? = 0
        var passes = 0
        repeat {
            let pass = try await transfer(frameBytes: frameBytes, frames: frames, ackEveryFrame: ackEveryFrame)
            bytes += pass.bytes
            seconds += pass.seconds
            cpuSeconds = combined(cpuSeconds, pass.cpuSeconds, +)
            passes += 1
        } while seconds < minimumSeconds
        return Transfer(
            bytes: bytes,
            frames: frames,
            passes: passes,
            seconds: seconds,
            ackEveryFrame: ackEveryFrame,
            cpuSeconds: cpuSeconds
        )
    }

    /// Writes `frames` frames of `frameBytes` bytes from a client socket to a sink socket over
    /// 127.0.0.1 and times it from the first write until the sink's final one-byte "done" arrives, so
    /// bytes still in socket buffers are not counted as sent. With `ackEveryFrame` the sink answers
    /// each frame with one byte and the client waits for it (one frame in flight, like a request that
    /// waits for its reply); otherwise the client streams. The sink reads in 1 MiB chunks and discards.
    ///
    /// Also returns the CPU time both threads spent on it (the sender's from its first write).
    ///
    /// Both ends are blocking POSIX sockets, each on its own POSIX thread: blocking calls inside a
    /// `Task` would hold one of the cooperative pool's threads (one per core; this machine may have
    /// two) for the whole transfer and could starve — or, with both ends in the pool, deadlock — the
    /// rest of the process. The sockets are TCP_NODELAY like the cluster's own connections, with the
    /// kernel's default buffer sizes, and time out after 30 s of silence so a failing end cannot hang
    /// the other.
    private static func transfer(
        frameBytes: Int,
        frames: Int,
        ackEveryFrame: Bool
    ) async throws
        -> (bytes: Int, seconds: Double, cpuSeconds: Double?)
    {
        precondition(frameBytes >= 1 && frames >= 1)
        let listener = try Socket.listenOnLoopback()
        let port = try listener.localPort()
        let total = frameBytes * frames
        async let received = onThread { () throws(SocketError) -> (bytes: Int, cpuSeconds: Double?) in
            defer { listener.release() }
            let connection = try listener.acceptOne()
            defer { connection.release() }
            return try sink(connection, total: total, frameBytes: frameBytes, ackEveryFrame: ackEveryFrame)
        }
        let sent: (seconds: Double, cpuSeconds: Double?)
        do {
            sent = try await onThread { () throws(SocketError) -> (seconds: Double, cpuSeconds: Double?) in
                let connection = try Socket.connectToLoopback(port: port)
                defer { connection.release() }
                return try source(connection, frameBytes: frameBytes, frames: frames, ackEveryFrame: ackEveryFrame)
            }
        } catch {
            listener.wake()
            _ = try? await received
            throw error
        }
        let sunk = try await received
        return (sunk.bytes, sent.seconds, combined(sunk.cpuSeconds, sent.cpuSeconds, +))
    }

    /// Reads until `total` bytes arrived; answers each frame (with `ackEveryFrame`) and the end with one
    /// byte. Returns the bytes and the thread's CPU time.
    private static func sink(
        _ connection: Socket,
        total: Int,
        frameBytes: Int,
        ackEveryFrame: Bool
    ) throws(SocketError)
        -> (bytes: Int, cpuSeconds: Double?)
    {
        let cpuStart = ProcessCPU.threadSeconds()
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 64)
        defer { buffer.deallocate() }
        var received = 0
        var inFrame = 0
        while received < total {
            // With acks a read never crosses a frame boundary, since the client sends nothing more until
            // it has the ack; streaming reads take whatever is there.
            let want = ackEveryFrame ? min(chunk, frameBytes - inFrame) : min(chunk, total - received)
            let count = try connection.receive(buffer, want)
            guard count > 0 else { throw SocketError("the client closed after \(received) of \(total) bytes") }
            received += count
            inFrame += count
            if ackEveryFrame, inFrame == frameBytes {
                inFrame = 0
                if received < total { try connection.sendByte() }
            }
        }
        try connection.sendByte()
        return (received, ProcessCPU.threadSeconds(since: cpuStart))
    }

    /// Sends the frames; returns the seconds from the first write until the final byte came back, and
    /// the thread's CPU time over them.
    private static func source(
        _ connection: Socket,
        frameBytes: Int,
        frames: Int,
        ackEveryFrame: Bool
    )
        throws(SocketError) -> (seconds: Double, cpuSeconds: Double?)
    {
        let payload = UnsafeMutableRawPointer.allocate(byteCount: frameBytes, alignment: 64)
        defer { payload.deallocate() }
        for index in 0..<frameBytes {
            payload.storeBytes(of: UInt8(truncatingIfNeeded: index &* 31), toByteOffset: index, as: UInt8.self)
        }
        let clock = ContinuousClock()
        let start = clock.now
        let cpuStart = ProcessCPU.threadSeconds()
        for frame in 0..<frames {
            try connection.sendAll(payload, frameBytes)
            if ackEveryFrame, frame < frames - 1 { try connection.receiveByte() }
        }
        try connection.receiveByte()
        return ((clock.now - start).inSeconds, ProcessCPU.threadSeconds(since: cpuStart))
    }

    /// Runs `work` on a new detached POSIX thread and returns its result to the awaiting task.
    private static func onThread<T: Sendable>(_ work: @escaping @Sendable () throws(SocketError) -> T) async throws -> T
    {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            let job = ThreadJob {
                do { continuation.resume(returning: try work()) } catch { continuation.resume(throwing: error) }
            }
            let retained = Unmanaged.passRetained(job).toOpaque()
            var thread = pthread_t()
            let status = pthread_create(
                &thread,
                nil,
                { argument in
                    let job = Unmanaged<ThreadJob>.fromOpaque(argument!).takeRetainedValue()
                    job.run()
                    return nil
                },
                retained
            )
            if status == 0 {
                pthread_detach(thread)
            } else {
                Unmanaged<ThreadJob>.fromOpaque(retained).release()
                continuation.resume(throwing: SocketError("cannot start a thread: error \(status)"))
            }
        }
    }

    // MARK: - Concurrent clients

    /// Lets `parties` concurrent clients start a timed phase together: each calls `arrive()` when ready
    /// and all resume once the last has arrived, with the same start instant. A client that fails calls
    /// `abort(_:)` so the others do not wait for it forever.
    public final class StartLine: Sendable {
        private struct State {
            var waiting: [CheckedContinuation<ContinuousClock.Instant, any Error>] = []
            var released: ContinuousClock.Instant?
            var failure: (any Error)?
        }

        private let parties: Int
        private let state = Mutex(State())

        public init(parties: Int) {
            precondition(parties >= 1)
            self.parties = parties
        }

        public func arrive() async throws -> ContinuousClock.Instant {
            try await withCheckedThrowingContinuation { continuation in
                let release = state.withLock {
                    state -> (ContinuousClock.Instant, [CheckedContinuation<ContinuousClock.Instant, any Error>])? in
                    if let failure = state.failure {
                        continuation.resume(throwing: failure)
                        return nil
                    }
                    state.waiting.append(continuation)
                    guard state.waiting.count == parties else { return nil }
                    let now = ContinuousClock.now
                    state.released = now
                    defer { state.waiting = [] }
                    return (now, state.waiting)
                }
                if let (start, waiting) = release {
                    for waiter in waiting { waiter.resume(returning: start) }
                }
            }
        }

        public func abort(_ error: any Error) {
            let waiting = state.withLock { state in
                if state.failure == nil { state.failure = error }
                defer { state.waiting = [] }
                return state.waiting
            }
            for waiter in waiting { waiter.resume(throwing: error) }
        }
    }

    // MARK: - Figures

    /// Percentiles of a set of latencies, in microseconds.
    public struct Latency: Sendable, Codable, Hashable {
        public var p50Micros: Double
        public var p99Micros: Double
        public var meanMicros: Double

        public init(_ samples: [Duration]) {
            let micros = samples.map { $0.inSeconds * 1e6 }.sorted()
            func at(_ q: Double) -> Double {
                micros.isEmpty ? 0 : micros[min(micros.count - 1, Int((q * Double(micros.count - 1)).rounded()))]
            }
            p50Micros = at(0.5)
            p99Micros = at(0.99)
            meanMicros = micros.isEmpty ? 0 : micros.reduce(0, +) / Double(micros.count)
        }
    }

    /// Prefill ingest of one frame size: payload bytes over the seconds the prefill requests took.
    public struct IngestRate: Sendable, Codable, Hashable {
        /// Requests the client kept in flight on its one worker connection.
        public var inFlight: Int
        public var frames: Int
        /// Tensor payload (keys and values) sent, without envelope and length prefix.
        public var payloadBytes: Int
        /// Summed over the batches of requests; opening and closing the sequences is not included.
        public var seconds: Double
        public var megabytesPerSecond: Double
        /// Each prefill request, from its write until its acknowledgement.
        public var latency: Latency
        /// CPU time per frame over the same batches, by process; nil where it cannot be read.
        public var cpuMicrosPerFrame: ProcessesCPU?

        public init(
            inFlight: Int,
            frames: Int,
            payloadBytes: Int,
            seconds: Double,
            latency: Latency,
            cpuSeconds: ProcessesCPU?
        ) {
            self.inFlight = inFlight
            self.frames = frames
            self.payloadBytes = payloadBytes
            self.seconds = seconds
            self.latency = latency
            megabytesPerSecond = seconds > 0 ? Double(payloadBytes) / seconds / 1e6 : 0
            cpuMicrosPerFrame = cpuSeconds.map { $0.scaled(by: 1e6 / Double(max(1, frames))) }
        }
    }

    /// CPU time of the processes an ingest measurement involves: the client sending the prefills
    /// (this process), the worker taking them and the coordinator (which gets the worker's layer
    /// statistics).
    public struct ProcessesCPU: Sendable, Codable, Hashable {
        public var client: Double
        public var worker: Double
        public var coordinator: Double

        public init(client: Double, worker: Double, coordinator: Double) {
            self.client = client
            self.worker = worker
            self.coordinator = coordinator
        }

        /// The CPU time each has used so far, in seconds; nil when one cannot be read.
        public static func now(worker: Int32, coordinator: Int32) -> ProcessesCPU? {
            guard let client = ProcessCPU.ownSeconds(), let worker = ProcessCPU.seconds(pid: worker),
                let coordinator = ProcessCPU.seconds(pid: coordinator)
            else { return nil }
            return ProcessesCPU(client: client, worker: worker, coordinator: coordinator)
        }

        public static func + (a: Self, b: Self) -> Self {
            ProcessesCPU(
                client: a.client + b.client,
                worker: a.worker + b.worker,
                coordinator: a.coordinator + b.coordinator
            )
        }

        public static func - (a: Self, b: Self) -> Self {
            ProcessesCPU(
                client: a.client - b.client,
                worker: a.worker - b.worker,
                coordinator: a.coordinator - b.coordinator
            )
        }

        public func scaled(by factor: Double) -> Self {
            ProcessesCPU(client: client * factor, worker: worker * factor, coordinator: coordinator * factor)
        }

        public var total: Double { client + worker + coordinator }
    }

    public struct IngestPoint: Sendable, Codable, Hashable {
        /// Tensor payload per frame (keys and values of one layer).
        public var payloadBytesPerFrame: Int
        /// The whole frame on the wire: length prefix and envelope around the payload.
        public var wireBytesPerFrame: Int
        public var promptLength: Int
        /// Each frame the whole prefill of a one-layer sequence, one rate per number in flight.
        public var tessera: [IngestRate]
        /// Each frame a part (one layer) of a longer sequence's prefill; empty when not measured
        /// (with more than one worker, a sequence's layers span workers).
        public var inParts: [IngestRate]
        /// The same payload bytes in the same frame sizes, streamed to a sink.
        public var plainTCP: Transfer
        /// The same, one frame in flight (the sink acknowledges each with one byte).
        public var plainTCPAcked: Transfer
        /// The first `tessera` rate (one request in flight) as a share of `plainTCP`, in percent.
        public var percentOfPlainTCP: Double

        public init(
            payloadBytesPerFrame: Int,
            wireBytesPerFrame: Int,
            promptLength: Int,
            tessera: [IngestRate],
            inParts: [IngestRate],
            plainTCP: Transfer,
            plainTCPAcked: Transfer
        ) {
            self.payloadBytesPerFrame = payloadBytesPerFrame
            self.wireBytesPerFrame = wireBytesPerFrame
            self.promptLength = promptLength
            self.tessera = tessera
            self.inParts = inParts
            self.plainTCP = plainTCP
            self.plainTCPAcked = plainTCPAcked
            percentOfPlainTCP = Self.percent(tessera.first?.megabytesPerSecond ?? 0, of: plainTCP)
        }

        /// `rate` as a share of `plainTCP`, in percent.
        public func percent(_ rate: IngestRate) -> Double { Self.percent(rate.megabytesPerSecond, of: plainTCP) }

        private static func percent(_ megabytesPerSecond: Double, of plain: Transfer) -> Double {
            plain.megabytesPerSecond > 0 ? 100 * megabytesPerSecond / plain.megabytesPerSecond : 0
        }
    }

    public struct DecodePoint: Sendable, Codable, Hashable {
        /// Concurrent clients, each with its own connections and its own sequences.
        public var connections: Int
        /// "real" (steps that run attention) or "cached" (a retry of the last step, answered from cache).
        public var kind: String
        public var roundTrips: Int
        /// From the common start until the last client's last reply.
        public var seconds: Double
        public var perSecond: Double
        public var latency: Latency
        /// Whether a client used up its prepared sequences before the phase's time was over.
        public var ranOutOfSequences: Bool

        public init(
            connections: Int,
            kind: String,
            roundTrips: Int,
            seconds: Double,
            latency: Latency,
            ranOutOfSequences: Bool
        ) {
            self.connections = connections
            self.kind = kind
            self.roundTrips = roundTrips
            self.seconds = seconds
            self.latency = latency
            self.ranOutOfSequences = ranOutOfSequences
            perSecond = seconds > 0 ? Double(roundTrips) / seconds : 0
        }
    }

    public struct Report: Sendable, Codable, Hashable {
        /// `mutual TLS` or `insecure`: how the cluster's connections ran.
        public var security: String
        public var workers: Int
        public var secondsPerPoint: Double
        public var onlineProcessors: Int
        public var ingest: [IngestPoint]
        public var decode: [DecodePoint]

        public init(
            security: String,
            workers: Int,
            secondsPerPoint: Double,
            onlineProcessors: Int,
            ingest: [IngestPoint],
            decode: [DecodePoint]
        ) {
            self.security = security
            self.workers = workers
            self.secondsPerPoint = secondsPerPoint
            self.onlineProcessors = onlineProcessors
            self.ingest = ingest
            self.decode = decode
        }
    }
}

extension Duration {
    /// The duration in seconds, as a Double.
    public var inSeconds: Double {
        let (whole, attoseconds) = components
        return Double(whole) + Double(attoseconds) * 1e-18
    }
}

// MARK: - POSIX sockets

struct SocketError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }

    /// The failed call and errno's text.
    static func last(_ call: String) -> SocketError {
        SocketError("\(call): \(String(cString: strerror(errno)))")
    }
}

/// A job handed to a new POSIX thread.
private final class ThreadJob: Sendable {
    let run: @Sendable () -> Void
    init(_ run: @escaping @Sendable () -> Void) { self.run = run }
}

/// A blocking TCP socket descriptor on 127.0.0.1.
private struct Socket: Sendable {
    let descriptor: Int32

    private static let timeoutSeconds = 30

    private static func make() throws(SocketError) -> Socket {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw .last("socket") }
        let socket = Socket(descriptor: descriptor)
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        let size = socklen_t(MemoryLayout<timeval>.size)
        guard setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, size) == 0,
            setsockopt(descriptor, SOL_SOCKET, SO_SNDTIMEO, &timeout, size) == 0
        else {
            socket.release()
            throw .last("setsockopt(SO_RCVTIMEO/SO_SNDTIMEO)")
        }
        return socket
    }

    private static func loopback(port: Int) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port)).bigEndian
        address.sin_addr.s_addr = in_addr_t(0x7F00_0001).bigEndian
        return address
    }

    static func listenOnLoopback() throws(SocketError) -> Socket {
        let socket = try make()
        var one: Int32 = 1
        var address = loopback(port: 0)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(socket.descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard setsockopt(socket.descriptor, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size)) == 0,
            bound == 0, listen(socket.descriptor, 1) == 0
        else {
            let error = SocketError.last("bind/listen on 127.0.0.1")
            socket.release()
            throw error
        }
        return socket
    }

    static func connectToLoopback(port: Int) throws(SocketError) -> Socket {
        let socket = try make()
        var one: Int32 = 1
        var address = loopback(port: port)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(socket.descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0,
            setsockopt(socket.descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                == 0
        else {
            let error = SocketError.last("connect to 127.0.0.1:\(port)")
            socket.release()
            throw error
        }
        return socket
    }

    func localPort() throws(SocketError) -> Int {
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let status = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        guard status == 0 else { throw .last("getsockname") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    func acceptOne() throws(SocketError) -> Socket {
        while true {
            let accepted = accept(descriptor, nil, nil)
            if accepted >= 0 {
                var one: Int32 = 1
                _ = setsockopt(accepted, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                var timeout = timeval(tv_sec: Self.timeoutSeconds, tv_usec: 0)
                let size = socklen_t(MemoryLayout<timeval>.size)
                _ = setsockopt(accepted, SOL_SOCKET, SO_RCVTIMEO, &timeout, size)
                _ = setsockopt(accepted, SOL_SOCKET, SO_SNDTIMEO, &timeout, size)
                return Socket(descriptor: accepted)
            }
            if errno != EINTR { throw .last("accept") }
        }
    }

    func receive(_ buffer: UnsafeMutableRawPointer, _ count: Int) throws(SocketError) -> Int {
        while true {
            let received = recv(descriptor, buffer, count, 0)
            if received >= 0 { return received }
            if errno != EINTR { throw .last("recv") }
        }
    }

    func sendAll(_ bytes: UnsafeRawPointer, _ count: Int) throws(SocketError) {
        var offset = 0
        while offset < count {
            let sent = send(descriptor, bytes + offset, count - offset, Int32(MSG_NOSIGNAL))
            if sent > 0 {
                offset += sent
            } else if sent < 0, errno != EINTR {
                throw .last("send")
            }
        }
    }

    func sendByte() throws(SocketError) {
        var byte: UInt8 = 1
        try sendAll(&byte, 1)
    }

    func receiveByte() throws(SocketError) {
        var byte: UInt8 = 0
        guard try receive(&byte, 1) == 1 else { throw SocketError("the sink closed before it acknowledged") }
    }

    /// Wakes a thread blocked in `accept` on this socket.
    func wake() { _ = shutdown(descriptor, Int32(SHUT_RDWR)) }

    func release() { _ = close(descriptor) }
}

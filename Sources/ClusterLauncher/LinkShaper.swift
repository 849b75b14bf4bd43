import ClusterAdmin
import Synchronization
import Workloads

#if canImport(Glibc)
import Glibc
#endif

/// Delay, jitter and loss on the hosts' links where the kernel has no netem: an iptables rule sends
/// every packet a host receives to an NFQUEUE, and this thread holds each one for its delay before
/// telling the kernel to let it go (or drops it), as netem's queue would. Jitter draws each packet's
/// delay uniformly from delay ± jitter, so packets can overtake each other, as under netem.
///
/// Only packet metadata crosses into this process (`NFQNL_COPY_META`), and segmentation offload
/// packets come whole (`NFQA_CFG_F_GSO`), so a 64 KiB TCP burst costs one verdict.
public final class LinkShaper: Sendable {
    /// One queue: a netlink socket bound to queue `number` in some network namespace.
    struct Queue {
        var socket: Int32
        var number: UInt16
    }

    private let stopPipe: (read: Int32, write: Int32)
    private let thread: pthread_t
    private let links: Links

    /// Starts the thread that shapes `queues` (already open, see ``open(queue:)``), each by its own
    /// entry of `links`.
    init(queues: [Queue], links: [LinkProfile], seed: UInt64) throws {
        var ends: [Int32] = [0, 0]
        guard pipe(&ends) == 0 else { throw LaunchError("cannot make a pipe: errno \(errno)") }
        stopPipe = (ends[0], ends[1])
        let loop = ShapingLoop(queues: queues, seed: seed, stop: ends[0])
        let shared = Links(links)
        self.links = shared
        thread = try startThread { loop.run(shared) }
    }

    /// What queue `index` does to packets from now on (a latency spike, a loss burst, and back).
    func setLink(_ index: Int, _ link: LinkProfile) {
        links.table.withLock { $0[index] = link }
    }

    /// Lets every held packet go, closes the queues and joins the thread.
    public func stop() {
        var byte: UInt8 = 1
        _ = write(stopPipe.write, &byte, 1)
        pthread_join(thread, nil)
        close(stopPipe.read)
        close(stopPipe.write)
    }

    /// A netlink socket bound to NFQUEUE `queue` of the calling thread's network namespace.
    static func open(queue: UInt16) throws -> Queue {
        let socket = Glibc.socket(
            AF_NETLINK,
            Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue),
            Netlink.netfilter
        )
        guard socket >= 0 else { throw LaunchError("cannot open a netfilter netlink socket: errno \(errno)") }
        do {
            var size: Int32 = 8 << 20
            _ = setsockopt(socket, SOL_SOCKET, SO_RCVBUFFORCE, &size, 4)
            var on: Int32 = 1
            // A full receive buffer drops notices instead of failing every later read.
            _ = setsockopt(socket, Netlink.level, Netlink.noBufferErrors, &on, 4)
            // sockaddr_nl (not in the Swift Glibc module): family, padding, port id 0 (the kernel
            // picks), no multicast groups.
            let address = Netlink.native(UInt16(AF_NETLINK)) + [UInt8](repeating: 0, count: 10)
            let bound = address.withUnsafeBytes {
                bind(socket, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
            }
            guard bound == 0 else { throw LaunchError("cannot bind a netlink socket: errno \(errno)") }
            let gso = UInt32(1 << 2)  // NFQA_CFG_F_GSO
            let configuration: [[UInt8]] = [
                // NFQA_CFG_CMD: bind (1), pad, protocol family (unused by kernels since 3.8).
                Netlink.attribute(1, [1, 0] + Netlink.bigEndian(UInt16(AF_INET))),
                // NFQA_CFG_PARAMS: copy range 0, copy mode META (1).
                Netlink.attribute(2, Netlink.bigEndian(UInt32(0)) + [1]),
                Netlink.attribute(3, Netlink.bigEndian(UInt32(Self.queueLength))),
                // NFQA_CFG_MASK and NFQA_CFG_FLAGS go together.
                Netlink.attribute(4, Netlink.bigEndian(gso)) + Netlink.attribute(5, Netlink.bigEndian(gso)),
            ]
            for attribute in configuration {
                try Netlink.request(socket, type: Netlink.config, queue: queue, attribute)
            }
            return Queue(socket: socket, number: queue)
        } catch {
            close(socket)
            throw error
        }
    }

    /// Packets a queue holds before the kernel drops more (netem's default limit is 1,000).
    static let queueLength = 10_000
}

/// Each queue's profile, changed by callers and read by the shaper thread.
private final class Links: Sendable {
    let table: Mutex<[LinkProfile]>
    init(_ links: [LinkProfile]) { table = Mutex(links) }
}

/// The shaper thread's state: held packets in the order they are due.
private final class ShapingLoop: @unchecked Sendable {
    // Touched only by the shaper thread once it runs.
    private let queues: [LinkShaper.Queue]
    private var random: SplitMix64
    private let stop: Int32
    /// (due in ns of CLOCK_MONOTONIC, queue index, packet id), sorted by due.
    private var held: [(due: UInt64, queue: Int, id: UInt32)] = []

    init(queues: [LinkShaper.Queue], seed: UInt64, stop: Int32) {
        self.queues = queues
        self.random = SplitMix64(state: seed)
        self.stop = stop
    }

    func run(_ links: Links) {
        var fds = queues.map { pollfd(fd: $0.socket, events: Int16(POLLIN), revents: 0) }
        fds.append(pollfd(fd: stop, events: Int16(POLLIN), revents: 0))
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            if let next = held.first {
                let left = next.due.subtractingReportingOverflow(Self.now())
                let nanoseconds = left.overflow ? 0 : left.partialValue
                var timeout = timespec(
                    tv_sec: Int(nanoseconds / 1_000_000_000),
                    tv_nsec: Int(nanoseconds % 1_000_000_000)
                )
                _ = Self.ppoll(&fds, nfds_t(fds.count), &timeout, nil)
            } else {
                _ = Self.ppoll(&fds, nfds_t(fds.count), nil, nil)
            }
            if fds.last!.revents != 0 { break }
            for index in queues.indices where fds[index].revents != 0 {
                receive(index, links.table.withLock { $0[index] }, &buffer)
            }
            release(upTo: Self.now())
        }
        release(upTo: .max)
        for queue in queues { close(queue.socket) }
    }

    /// Reads every packet notice waiting on queue `index`: drops the lost ones, holds the rest.
    private func receive(_ index: Int, _ link: LinkProfile, _ buffer: inout [UInt8]) {
        var dropped: [UInt8] = []
        while true {
            let count = buffer.withUnsafeMutableBytes {
                recv(queues[index].socket, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT))
            }
            guard count > 0 else { break }
            let now = Self.now()
            for id in Netlink.packetIDs(buffer[..<count]) {
                if link.lossPercent > 0, Double(random.next() >> 11) / Double(1 << 53) * 100 < link.lossPercent {
                    dropped += Netlink.verdict(id, accept: false, queue: queues[index].number)
                    continue
                }
                var delay = Int64(link.delayMicroseconds)
                if link.jitterMicroseconds > 0 {
                    delay +=
                        Int64(random.next() % UInt64(2 * link.jitterMicroseconds + 1)) - Int64(link.jitterMicroseconds)
                }
                let due = now + UInt64(max(0, delay)) * 1_000
                let position = held.partitioningIndex { $0.due > due }
                held.insert((due, index, id), at: position)
            }
        }
        if !dropped.isEmpty { Netlink.send(queues[index].socket, dropped) }
    }

    /// Accepts every held packet due by `now`, one datagram of verdicts per queue.
    private func release(upTo now: UInt64) {
        let due = held.partitioningIndex { $0.due > now }
        guard due > 0 else { return }
        var verdicts = [[UInt8]](repeating: [], count: queues.count)
        for packet in held[..<due] {
            verdicts[packet.queue] += Netlink.verdict(packet.id, accept: true, queue: queues[packet.queue].number)
        }
        held.removeFirst(due)
        for (index, batch) in verdicts.enumerated() where !batch.isEmpty { Netlink.send(queues[index].socket, batch) }
    }

    /// `ppoll` waits with nanosecond resolution (`poll` rounds to milliseconds, too coarse for delays of
    /// a few); a GNU extension the Swift Glibc module leaves out.
    private static let ppoll = glibc(
        "ppoll",
        as: (@convention(c) (UnsafeMutablePointer<pollfd>?, nfds_t, UnsafePointer<timespec>?, UnsafeRawPointer?) ->
            Int32).self
    )!

    private static func now() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
    }
}

extension Array {
    /// The first index whose element satisfies `isAfter`, for an array partitioned by it.
    fileprivate func partitioningIndex(where isAfter: (Element) -> Bool) -> Int {
        var low = 0
        var high = count
        while low < high {
            let middle = (low + high) / 2
            if isAfter(self[middle]) { high = middle } else { low = middle + 1 }
        }
        return low
    }
}

/// The few netlink messages of `nfnetlink_queue` the shaper needs.
private enum Netlink {
    /// NETLINK_NETFILTER, SOL_NETLINK and NETLINK_NO_ENOBUFS from <linux/netlink.h>.
    static let netfilter: Int32 = 12
    static let level: Int32 = 270
    static let noBufferErrors: Int32 = 5
    /// Message types of the queue subsystem (NFNL_SUBSYS_QUEUE = 3).
    static let packet = UInt16(3 << 8 | 0)
    static let verdictType = UInt16(3 << 8 | 1)
    static let config = UInt16(3 << 8 | 2)
    static let error = UInt16(2)

    static func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.bigEndian) { Array($0) }
    }

    static func native<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value) { Array($0) }
    }

    /// A netlink attribute: length, type, payload, padded to 4 bytes.
    static func attribute(_ type: UInt16, _ payload: [UInt8]) -> [UInt8] {
        let bytes = native(UInt16(4 + payload.count)) + native(type) + payload
        return bytes + [UInt8](repeating: 0, count: (4 - bytes.count % 4) % 4)
    }

    /// A message: header, `nfgenmsg` for `queue`, attributes.
    static func message(type: UInt16, flags: UInt16, queue: UInt16, _ attributes: [UInt8]) -> [UInt8] {
        let body = [UInt8(AF_UNSPEC), 0] + bigEndian(queue) + attributes
        return native(UInt32(16 + body.count)) + native(type) + native(flags) + native(UInt32(0)) + native(UInt32(0))
            + body
    }

    static func verdict(_ id: UInt32, accept: Bool, queue: UInt16) -> [UInt8] {
        message(
            type: verdictType,
            flags: 1,  // NLM_F_REQUEST
            queue: queue,
            attribute(2, bigEndian(UInt32(accept ? 1 : 0)) + bigEndian(id))  // NFQA_VERDICT_HDR
        )
    }

    static func send(_ socket: Int32, _ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(socket, $0.baseAddress, $0.count, 0) }
    }

    /// Sends a configuration message asking for an acknowledgement and throws if the kernel refuses it.
    static func request(_ socket: Int32, type: UInt16, queue: UInt16, _ attribute: [UInt8]) throws {
        send(socket, message(type: type, flags: 1 | 4, queue: queue, attribute))  // NLM_F_REQUEST | NLM_F_ACK
        var answer = [UInt8](repeating: 0, count: 4096)
        let count = answer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
        guard count >= 20, readNative(UInt16.self, answer, 4) == error else {
            throw LaunchError("NFQUEUE \(queue): unexpected answer to its configuration")
        }
        let code = readNative(Int32.self, answer, 16)
        guard code == 0 else {
            throw LaunchError("NFQUEUE \(queue): the kernel refused its configuration (errno \(-code))")
        }
    }

    /// The ids of the packets announced in a datagram of messages.
    static func packetIDs(_ bytes: ArraySlice<UInt8>) -> [UInt32] {
        var ids: [UInt32] = []
        var offset = bytes.startIndex
        while offset + 16 <= bytes.endIndex {
            let length = Int(readNative(UInt32.self, bytes, offset))
            guard length >= 16, offset + length <= bytes.endIndex else { break }
            if readNative(UInt16.self, bytes, offset + 4) == packet {
                var attribute = offset + 20
                while attribute + 4 <= offset + length {
                    let size = Int(readNative(UInt16.self, bytes, attribute))
                    guard size >= 4 else { break }
                    if readNative(UInt16.self, bytes, attribute + 2) & 0x7FFF == 1, size >= 8 {  // NFQA_PACKET_HDR
                        ids.append(UInt32(bigEndian: readNative(UInt32.self, bytes, attribute + 4)))
                    }
                    attribute += (size + 3) & ~3
                }
            }
            offset += (length + 3) & ~3
        }
        return ids
    }

    static func readNative<T: FixedWidthInteger, C: RandomAccessCollection<UInt8>>(
        _: T.Type,
        _ bytes: C,
        _ offset: C.Index
    ) -> T where C.Index == Int {
        var value = T.zero
        withUnsafeMutableBytes(of: &value) { raw in
            for index in 0..<MemoryLayout<T>.size { raw[index] = bytes[offset + index] }
        }
        return value
    }
}

/// Runs `body` on a new thread of its own; returns the thread to join.
func startThread(_ body: @escaping @Sendable () -> Void) throws -> pthread_t {
    final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    var thread = pthread_t()
    let context = Unmanaged.passRetained(Box(body)).toOpaque()
    let created = pthread_create(
        &thread,
        nil,
        { context in
            Unmanaged<Box>.fromOpaque(context!).takeRetainedValue().body()
            return nil
        },
        context
    )
    guard created == 0 else {
        Unmanaged<Box>.fromOpaque(context).release()
        throw LaunchError("cannot start a thread: error \(created)")
    }
    return thread
}

/// Runs `body` on a thread that entered network namespace `namespace` first (`/run/netns/NAME`), and
/// waits for it: sockets it opens stay in that namespace.
func inNamespace<T: Sendable>(_ namespace: String, _ body: @escaping @Sendable () throws -> T) throws -> T {
    let result = Mutex<Result<T, any Error>?>(nil)
    let thread = try startThread {
        let outcome: Result<T, any Error>
        let file = Glibc.open("/run/netns/\(namespace)", O_RDONLY | O_CLOEXEC)
        let setns = glibc("setns", as: (@convention(c) (Int32, Int32) -> Int32).self)!
        let newNetworkNamespace: Int32 = 0x4000_0000  // CLONE_NEWNET
        if file < 0 || setns(file, newNetworkNamespace) != 0 {
            outcome = .failure(LaunchError("cannot enter network namespace \(namespace): errno \(errno)"))
        } else {
            outcome = Result { try body() }
        }
        if file >= 0 { close(file) }
        result.withLock { $0 = outcome }
    }
    pthread_join(thread, nil)
    return try result.withLock { $0! }.get()
}

public import ClusterWire
package import NIOCore
import Synchronization

/// Network faults to inject into a connection's frames: seeded, per connection, on whole frames.
///
/// Frames are counted per connection after the handshake (the first frame each way is never touched).
/// Whether frame `i` of a direction is dropped, duplicated, reordered, corrupted or delayed depends only
/// on `seed`, the direction and `i` (see `fault(direction:frame:)`), so a run can be replayed.
///
/// The compact form, for a CLI flag, is `key=value` pairs separated by commas, e.g.
/// `drop=0.1,delay=5ms..20ms,corrupt=0.01,close-after=100,peer=worker-2,direction=outbound,seed=7`;
/// `none` (or the empty string) is the identity. `description` prints the same form.
public struct FaultPlan: Sendable, Hashable, CustomStringConvertible {
    /// Which frames of a connection the plan applies to, seen from this process.
    public enum Direction: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
        case inbound
        case outbound
        case both

        public var description: String { rawValue }

        func includes(_ direction: Direction) -> Bool { self == .both || self == direction }
    }

    /// Probability that a frame is lost.
    public var drop: Double
    /// Probability that a frame is delivered twice.
    public var duplicate: Double
    /// Probability that a frame is held back and delivered after the next frame in its direction.
    public var reorder: Double
    /// Probability that a frame's payload is damaged so that the receiving codec rejects it.
    public var corrupt: Double
    /// Each frame waits a uniformly drawn time from this range; frames stay in order.
    public var delay: ClosedRange<Duration>
    /// Close the connection once this many post-handshake frames (in `direction`, to `peer`) were seen.
    public var closeAfterFrames: Int?
    /// Only connections to the peer with this node id; nil for all.
    public var peer: String?
    public var direction: Direction
    public var seed: UInt64

    public init(
        drop: Double = 0,
        duplicate: Double = 0,
        reorder: Double = 0,
        corrupt: Double = 0,
        delay: ClosedRange<Duration> = Duration.zero...Duration.zero,
        closeAfterFrames: Int? = nil,
        peer: String? = nil,
        direction: Direction = .both,
        seed: UInt64 = 0
    ) {
        self.drop = drop
        self.duplicate = duplicate
        self.reorder = reorder
        self.corrupt = corrupt
        self.delay = delay
        self.closeAfterFrames = closeAfterFrames
        self.peer = peer
        self.direction = direction
        self.seed = seed
    }

    /// No faults: every frame passes unchanged.
    public static let none = FaultPlan()

    /// Whether the plan leaves every frame alone (whatever its peer, direction and seed).
    public var isIdentity: Bool {
        drop == 0 && duplicate == 0 && reorder == 0 && corrupt == 0 && delay.upperBound == .zero
            && closeAfterFrames == nil
    }

    /// Checks the ranges; the error names the key and what is allowed.
    public func validate() throws(WireError) {
        for (key, value) in [("drop", drop), ("duplicate", duplicate), ("reorder", reorder), ("corrupt", corrupt)] {
            guard (0...1).contains(value) else {
                throw WireError(.invalidValue, "fault \(key)=\(value) must be a probability in 0...1")
            }
        }
        guard delay.lowerBound >= .zero else {
            throw WireError(.invalidValue, "fault delay=\(Self.format(delay)) must not be negative")
        }
        if let closeAfterFrames, closeAfterFrames < 1 {
            throw WireError(.invalidValue, "fault close-after=\(closeAfterFrames) must be at least 1")
        }
        if let peer, peer.isEmpty || peer.contains(",") {
            throw WireError(.invalidValue, "fault peer='\(peer)' must be a non-empty node id without ','")
        }
    }

    // MARK: Compact form

    static let keys = "drop, duplicate, reorder, corrupt, delay, close-after, peer, direction, seed"

    /// Parses the compact form (see the type's documentation) and validates the result.
    public init(parsing text: String) throws(WireError) {
        self.init()
        if text.isEmpty || text == "none" { return }
        var seen: Set<Substring> = []
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard let equals = item.firstIndex(of: "=") else {
                throw WireError(.badRequest, "fault '\(item)' must be key=value with a key among \(Self.keys)")
            }
            let key = item[..<equals]
            let value = String(item[item.index(after: equals)...])
            guard seen.insert(key).inserted else {
                throw WireError(.badRequest, "fault key '\(key)' appears more than once")
            }
            switch key {
            case "drop": drop = try Self.probability(key, value)
            case "duplicate": duplicate = try Self.probability(key, value)
            case "reorder": reorder = try Self.probability(key, value)
            case "corrupt": corrupt = try Self.probability(key, value)
            case "delay": delay = try Self.delayRange(value)
            case "close-after":
                guard let count = Int(value), count >= 1 else {
                    throw WireError(.badRequest, "fault close-after=\(value) must be a whole number of frames >= 1")
                }
                closeAfterFrames = count
            case "peer":
                guard !value.isEmpty else { throw WireError(.badRequest, "fault peer= needs a node id") }
                peer = value
            case "direction":
                guard let parsed = Direction(rawValue: value) else {
                    throw WireError(.badRequest, "fault direction=\(value) must be one of inbound, outbound, both")
                }
                direction = parsed
            case "seed":
                guard let parsed = UInt64(value) else {
                    throw WireError(.badRequest, "fault seed=\(value) must be a whole number in 0...\(UInt64.max)")
                }
                seed = parsed
            default:
                throw WireError(.badRequest, "unknown fault key '\(key)'; allowed keys: \(Self.keys)")
            }
        }
        try validate()
    }

    /// The compact form, listing only what differs from `none`.
    public var description: String {
        var parts: [String] = []
        for (key, value) in [("drop", drop), ("duplicate", duplicate), ("reorder", reorder), ("corrupt", corrupt)]
        where value != 0 {
            parts.append("\(key)=\(value)")
        }
        if delay != Duration.zero...Duration.zero { parts.append("delay=\(Self.format(delay))") }
        if let closeAfterFrames { parts.append("close-after=\(closeAfterFrames)") }
        if let peer { parts.append("peer=\(peer)") }
        if direction != .both { parts.append("direction=\(direction)") }
        if seed != 0 { parts.append("seed=\(seed)") }
        return parts.isEmpty ? "none" : parts.joined(separator: ",")
    }

    private static func probability(_ key: Substring, _ value: String) throws(WireError) -> Double {
        guard let parsed = Double(value), (0...1).contains(parsed) else {
            throw WireError(.badRequest, "fault \(key)=\(value) must be a probability in 0...1, e.g. 0.05")
        }
        return parsed
    }

    /// `5ms` or `5ms..20ms`.
    private static func delayRange(_ value: String) throws(WireError) -> ClosedRange<Duration> {
        let bounds = value.split(separator: "..", omittingEmptySubsequences: false)
        guard bounds.count <= 2, let lower = duration(bounds[0]), let upper = duration(bounds[bounds.count - 1]),
            lower >= .zero
        else {
            throw WireError(
                .badRequest,
                "fault delay=\(value) must be a duration or a range like 5ms..20ms: whole numbers, not negative, "
                    + "with ns, us, ms or s"
            )
        }
        guard lower <= upper else {
            throw WireError(.badRequest, "fault delay=\(value): the lower bound exceeds the upper bound")
        }
        return lower...upper
    }

    private static let units: [(suffix: String, nanoseconds: Int64)] = [
        ("ns", 1), ("us", 1_000), ("ms", 1_000_000), ("s", 1_000_000_000),
    ]

    private static func duration(_ text: Substring) -> Duration? {
        for unit in units where text.hasSuffix(unit.suffix) {
            guard let count = Int64(text.dropLast(unit.suffix.count)) else { return nil }
            let nanoseconds = count.multipliedReportingOverflow(by: unit.nanoseconds)
            return nanoseconds.overflow ? nil : .nanoseconds(nanoseconds.partialValue)
        }
        return nil
    }

    private static func format(_ range: ClosedRange<Duration>) -> String {
        range.lowerBound == range.upperBound
            ? format(range.lowerBound) : "\(format(range.lowerBound))..\(format(range.upperBound))"
    }

    private static func format(_ duration: Duration) -> String {
        let nanoseconds = duration.nanoseconds
        let unit = units.last { nanoseconds % $0.nanoseconds == 0 } ?? units[0]
        return "\(nanoseconds / unit.nanoseconds)\(unit.suffix)"
    }
}

extension Duration {
    /// Whole nanoseconds (sub-nanosecond parts are dropped; delays never have them).
    fileprivate var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds &* 1_000_000_000 &+ attoseconds / 1_000_000_000
    }
}

// MARK: - Decisions

/// What happens to one post-handshake frame.
package struct FrameFault: Sendable, Hashable {
    package var drop = false
    package var duplicate = false
    package var reorder = false
    /// When set, the byte written over the payload's first byte (see `fault(direction:frame:)`).
    package var corruptTag: UInt8?
    package var delay: Duration = .zero

    package init() {}
}

extension FaultPlan {
    /// The fault for post-handshake frame `index` in `direction`: a pure function of the seed, the
    /// direction and the index, so the same seed gives the same faults at the same frames.
    ///
    /// Corruption overwrites the first tag of the Envelope with a tag of an invalid wire type (6 or 7),
    /// which protobuf always rejects. A byte flipped at random can instead yield a valid Envelope with
    /// silently different data (a tensor value, a tenant), which TCP's checksums make unrealistic and
    /// which would break the "same outputs with and without faults" invariant.
    package func fault(direction: Direction, frame index: Int) -> FrameFault {
        var dice = FaultDice(seed: seed, direction: direction, index: index)
        // Every roll is drawn each time, so changing one probability does not move the others' faults.
        let dropRoll = dice.unit()
        let duplicateRoll = dice.unit()
        let reorderRoll = dice.unit()
        let corruptRoll = dice.unit()
        let delayRoll = dice.unit()
        let tagRoll = dice.next()
        var fault = FrameFault()
        guard dropRoll >= drop else {
            fault.drop = true
            return fault
        }
        fault.duplicate = duplicateRoll < duplicate
        fault.reorder = reorderRoll < reorder
        if corruptRoll < corrupt {
            let fieldNumber = 1 + tagRoll % 15  // one-byte tags
            let wireType = 6 + (tagRoll >> 8) & 1
            fault.corruptTag = UInt8(fieldNumber << 3 | wireType)
        }
        let lower = delay.lowerBound.nanoseconds
        let span = delay.upperBound.nanoseconds - lower
        fault.delay = .nanoseconds(lower + Int64(Double(span) * delayRoll))
        return fault
    }
}

/// SplitMix64 keyed by (seed, direction, frame index), so each frame's rolls are independent of the
/// order in which frames of the two directions arrive.
struct FaultDice {
    private var state: UInt64

    init(seed: UInt64, direction: FaultPlan.Direction, index: Int) {
        let lane: UInt64 = direction == .inbound ? 1 : 2
        state = Self.mix(seed ^ Self.mix(UInt64(truncatingIfNeeded: index) &* 4 &+ lane))
    }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        return Self.mix(state)
    }

    /// Uniform in [0, 1).
    mutating func unit() -> Double { Double(next() >> 11) * 0x1p-53 }

    private static func mix(_ value: UInt64) -> UInt64 {
        var z = value
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

// MARK: - Shared plan

/// The plan in force for a process's connections; change it at run time with `update(_:)`. Handlers
/// read it for every frame, so a change applies to the next frame of every connection.
public final class FaultInjector: Sendable {
    private let current: Mutex<FaultPlan>

    /// An injector that starts with `FaultPlan.none`.
    public init() {
        current = Mutex(.none)
    }

    public init(_ plan: FaultPlan) throws(WireError) {
        try plan.validate()
        current = Mutex(plan)
    }

    public var plan: FaultPlan { current.withLock { $0 } }

    public func update(_ plan: FaultPlan) throws(WireError) {
        try plan.validate()
        current.withLock { $0 = plan }
    }
}

// MARK: - Handler

/// Applies the injector's plan to one connection's frames.
///
/// It sits between the frame codec and `EnvelopeCodecHandler` (see `addFaultInjection(_:)`): inbound,
/// `ByteToMessageHandler(FrameDecoder)` has already cut the byte stream into whole frame payloads;
/// outbound, `EnvelopeCodecHandler` hands down one payload per envelope and `FrameEncoder` below adds
/// the length prefix afterwards. So the handler always acts on whole frames and can never damage a
/// length prefix: a corrupted frame is a well-framed but malformed Envelope.
///
/// Delayed frames wait in a queue per direction and are released in order by timers on the event
/// loop. When the channel goes inactive, delayed inbound frames are delivered at once (so data the
/// peer sent is not lost) and delayed outbound writes fail.
package final class FaultInjectionHandler: ChannelDuplexHandler {
    package typealias InboundIn = ByteBuffer
    package typealias InboundOut = ByteBuffer
    package typealias OutboundIn = ByteBuffer
    package typealias OutboundOut = ByteBuffer

    private enum Event {
        case read(ByteBuffer)
        case write(ByteBuffer, EventLoopPromise<Void>?)
        case close
    }

    private typealias Direction = FaultPlan.Direction

    /// One direction's state.
    private final class Lane {
        let direction: Direction
        /// Frames seen, the handshake frame included.
        var frames = 0
        /// Post-handshake frames the plan applied to: the index for `FaultPlan.fault`.
        var faultIndex = 0
        var queue = CircularBuffer<(deadline: NIODeadline, event: Event)>()
        /// A frame held back by `reorder`, with its delay; released after the next frame.
        var held: (event: Event, delay: Duration)?
        var timer: Scheduled<Void>?

        init(_ direction: Direction) { self.direction = direction }
    }

    private let injector: FaultInjector
    private let inbound = Lane(.inbound)
    private let outbound = Lane(.outbound)
    /// The peer's node id, from its Hello or HelloAck (the first inbound frame).
    private var peerID: String?
    /// Frames counted toward `closeAfterFrames`, both directions.
    private var countedFrames = 0
    /// Set once the close is decided (or the channel is gone): later frames are discarded.
    private var closing = false
    /// The last write passed down, so that a planned close waits for it.
    private var lastWrite: EventLoopFuture<Void>?

    package init(injector: FaultInjector) {
        self.injector = injector
    }

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        arrived(.read(Self.unwrapInboundIn(data)), in: inbound, context: context)
    }

    package func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        arrived(.write(Self.unwrapOutboundIn(data), promise), in: outbound, context: context)
    }

    package func channelInactive(context: ChannelHandlerContext) {
        closing = true
        releaseAll(inbound, context: context)
        failPending(outbound)
        context.fireChannelInactive()
    }

    package func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Keep the error behind the frames that arrived before it.
        releaseAll(inbound, context: context)
        context.fireErrorCaught(error)
    }

    package func handlerRemoved(context: ChannelHandlerContext) {
        inbound.timer?.cancel()
        inbound.queue.removeAll()
        inbound.held = nil
        failPending(outbound)
    }

    private func arrived(_ event: Event, in lane: Lane, context: ChannelHandlerContext) {
        lane.frames += 1
        guard !closing else {
            if case .write(_, let promise) = event { promise?.fail(ChannelError.ioOnClosedChannel) }
            return
        }
        guard lane.frames > 1 else {
            // The handshake frame passes untouched; the inbound one names the peer.
            if lane.direction == .inbound, case .read(let frame) = event { peerID = Self.nodeID(inHandshake: frame) }
            emit(event, delay: .zero, in: lane, context: context)
            return
        }
        let plan = injector.plan
        guard !plan.isIdentity, plan.direction.includes(lane.direction), plan.peer == nil || plan.peer == peerID
        else {
            emit(event, delay: .zero, in: lane, context: context)
            return
        }
        let fault = plan.fault(direction: lane.direction, frame: lane.faultIndex)
        lane.faultIndex += 1
        countedFrames += 1
        if fault.drop {
            // A lost frame still counts as sent, as on a real network.
            if case .write(_, let promise) = event { promise?.succeed(()) }
        } else {
            var event = event
            if let tag = fault.corruptTag { event = Self.corrupted(event, tag: tag) }
            if fault.reorder, lane.held == nil {
                lane.held = (event, fault.delay)
            } else {
                if fault.duplicate, let copy = Self.copyWithoutPromise(event) {
                    enqueue(copy, delay: fault.delay, in: lane, context: context)
                }
                emit(event, delay: fault.delay, in: lane, context: context)
            }
        }
        if let limit = plan.closeAfterFrames, countedFrames >= limit {
            closing = true
            if let held = lane.held {
                lane.held = nil
                enqueue(held.event, delay: held.delay, in: lane, context: context)
            }
            enqueue(.close, delay: .zero, in: lane, context: context)
        }
    }

    /// Queues `event`, then the frame held back by `reorder`, if any.
    private func emit(_ event: Event, delay: Duration, in lane: Lane, context: ChannelHandlerContext) {
        enqueue(event, delay: delay, in: lane, context: context)
        if let held = lane.held {
            lane.held = nil
            enqueue(held.event, delay: held.delay, in: lane, context: context)
        }
    }

    /// Performs `event` now if nothing waits ahead of it, else queues it no earlier than its predecessor.
    private func enqueue(_ event: Event, delay: Duration, in lane: Lane, context: ChannelHandlerContext) {
        if lane.queue.isEmpty, delay <= .zero {
            perform(event, context: context)
            return
        }
        var deadline = NIODeadline.now() + TimeAmount(delay)
        if let last = lane.queue.last, last.deadline > deadline { deadline = last.deadline }
        lane.queue.append((deadline, event))
        if lane.timer == nil { schedule(lane, context: context) }
    }

    private func schedule(_ lane: Lane, context: ChannelHandlerContext) {
        guard let head = lane.queue.first else { return }
        lane.timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: head.deadline) {
            lane.timer = nil
            self.release(lane, until: .now(), context: context)
            self.schedule(lane, context: context)
        }
    }

    /// Performs the queued events due by `deadline`, then completes the read or write batch.
    private func release(_ lane: Lane, until deadline: NIODeadline, context: ChannelHandlerContext) {
        var released = false
        while let head = lane.queue.first, head.deadline <= deadline {
            lane.queue.removeFirst()
            if case .close = head.event {
                // Complete the batch while the channel is still open.
                if released { completeBatch(lane, context: context) }
                released = false
            } else {
                released = true
            }
            perform(head.event, context: context)
        }
        if released { completeBatch(lane, context: context) }
    }

    private func completeBatch(_ lane: Lane, context: ChannelHandlerContext) {
        if lane.direction == .inbound {
            context.fireChannelReadComplete()
        } else {
            context.flush()
        }
    }

    /// Delivers every held and queued inbound frame now, in order.
    private func releaseAll(_ lane: Lane, context: ChannelHandlerContext) {
        lane.timer?.cancel()
        lane.timer = nil
        if let held = lane.held {
            lane.held = nil
            lane.queue.append((.distantPast, held.event))
        }
        release(lane, until: .distantFuture, context: context)
    }

    private func failPending(_ lane: Lane) {
        lane.timer?.cancel()
        lane.timer = nil
        var events = lane.queue.map { $0.event }
        lane.queue.removeAll()
        if let held = lane.held { events.append(held.event) }
        lane.held = nil
        for case .write(_, let promise) in events { promise?.fail(ChannelError.ioOnClosedChannel) }
    }

    private func perform(_ event: Event, context: ChannelHandlerContext) {
        switch event {
        case .read(let frame):
            context.fireChannelRead(Self.wrapInboundOut(frame))
        case .write(let frame, let promise):
            let written = context.eventLoop.makePromise(of: Void.self)
            written.futureResult.cascade(to: promise)
            context.write(Self.wrapOutboundOut(frame), promise: written)
            lastWrite = written.futureResult
        case .close:
            context.flush()
            if let lastWrite {
                lastWrite.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            } else {
                context.close(promise: nil)
            }
        }
    }

    private static func corrupted(_ event: Event, tag: UInt8) -> Event {
        switch event {
        case .read(var frame):
            frame.setInteger(tag, at: frame.readerIndex)  // copy-on-write: the original bytes stay intact
            return .read(frame)
        case .write(var frame, let promise):
            frame.setInteger(tag, at: frame.readerIndex)
            return .write(frame, promise)
        case .close:
            return .close
        }
    }

    /// The first copy of a duplicated write carries no promise; the second completes the caller's.
    private static func copyWithoutPromise(_ event: Event) -> Event? {
        switch event {
        case .read: event
        case .write(let frame, _): .write(frame, nil)
        case .close: nil
        }
    }

    private static func nodeID(inHandshake frame: ByteBuffer) -> String? {
        switch try? Tessera_V1_Envelope(frame: frame).body {
        case .hello(let hello): hello.nodeID
        case .helloAck(let ack): ack.nodeID
        default: nil
        }
    }
}

@available(*, unavailable)
extension FaultInjectionHandler: Sendable {}

extension ChannelPipeline.SynchronousOperations {
    /// Inserts a `FaultInjectionHandler` just before the `EnvelopeCodecHandler` that
    /// `addWireHandlers(maxFrameBytes:)` installed, where it sees whole frame payloads both ways.
    package func addFaultInjection(_ injector: FaultInjector) throws {
        let codec = try handler(type: EnvelopeCodecHandler.self)
        try addHandler(FaultInjectionHandler(injector: injector), position: .before(codec))
    }
}

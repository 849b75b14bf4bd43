package import ClusterWire
import NIOCore

/// The wire-facing half of a node, as one function of untrusted bytes, for coverage-guided fuzzing
/// (the `tessera-fuzz` executable in `Fuzz/` calls `run` for every input libFuzzer makes).
///
/// One input is a byte stream from a peer. `run` cuts it into frames with `FrameDecoder`, parses
/// every frame as an Envelope, runs the handshake checks of the coordinator, a worker and a client on
/// it, and converts its body with every validating conversion the handlers apply. Every error is an
/// expected answer to bad input and is swallowed (after building the Error frame a node would send);
/// only a crash is a finding: a trap (overflow, out-of-range index, force unwrap), an address
/// sanitizer report, or one of these properties failing as a `precondition`:
///
/// - a frame parses to the same envelope (or fails the same way) as swift-protobuf parses it, though
///   nodes leave the tensors of prefills and shard copies in the frame instead of copying them;
/// - the stream gives the same frames, and the same error, when it arrives in two pieces cut at a
///   point the input chooses (partial headers and payloads) as in one;
/// - a parsed envelope serializes, and parses back to the same bytes (nodes re-send what they
///   receive: a primary forwards prefill and decode to its replicas);
/// - a hello one side accepts, its answer is accepted by the connecting side;
/// - a value a conversion accepts encodes again and decodes to the same value.
public enum WireFuzzing {
    /// The longest input the fuzzer makes (`scripts/fuzz.sh` passes it as `-max_len`), and the
    /// longest frame accepted: a longer one could never arrive whole, and the decoder would reserve
    /// its declared length (up to 64 MiB) to assemble it, which under the address sanitizer (shadow
    /// memory poisoned on every allocation and free) cost a third of the run's time.
    public static let maxInputBytes = 1 << 20

    /// Feeds one input through the frame decoder, the envelope decoder, the handshake checks and
    /// the body conversions.
    public static func run(_ bytes: UnsafeRawBufferPointer) {
        _ = self.receive(bytes)
    }

    /// `run`, returning the errors the body conversions answered (handshake rejections excluded: most
    /// frames are not a hello); lets tests check that the seeds pass every check.
    package static func receive(_ bytes: UnsafeRawBufferPointer) -> [WireError] {
        let stream = ByteBuffer(bytes: bytes)
        let whole = Framing([stream])
        // The input's last byte places the cut anywhere from before the first byte to after the last.
        let cut = bytes.isEmpty ? 0 : bytes.count * Int(bytes[bytes.count - 1]) / Int(UInt8.max)
        let pieces = Framing([
            stream.getSlice(at: 0, length: cut)!,
            stream.getSlice(at: cut, length: stream.readableBytes - cut)!,
        ])
        precondition(
            pieces == whole,
            "the stream framed differently when cut at byte \(cut): \(pieces.summary) against \(whole.summary)"
        )
        var receiver = Receiver()
        if let failure = whole.failure { receiver.answer(requestID: 0, failure) }
        for frame in whole.frames { receiver.receive(frame) }
        return receiver.answered
    }
}

/// The frames `FrameDecoder` cuts from a stream that arrives in `pieces`, then ends; and the error
/// that stopped it, if any.
struct Framing: Equatable {
    var frames: [ByteBuffer] = []
    var failure: WireError?

    init(_ pieces: [ByteBuffer]) {
        let processor = NIOSingleStepByteToMessageProcessor(FrameDecoder(maxFrameBytes: WireFuzzing.maxInputBytes))
        var frames: [ByteBuffer] = []
        do {
            for piece in pieces {
                try processor.process(buffer: piece) { frames.append($0) }
            }
            try processor.finishProcessing(seenEOF: true) { frames.append($0) }
        } catch let error as WireError {
            self.failure = error
        } catch {
            preconditionFailure("FrameDecoder threw \(error), not a WireError")
        }
        self.frames = frames
    }

    /// The frames and the error's code; the message may name how many bytes had arrived, which
    /// depends on the cut.
    static func == (lhs: Framing, rhs: Framing) -> Bool {
        lhs.frames == rhs.frames && lhs.failure?.code == rhs.failure?.code
    }

    var summary: String {
        "\(frames.count) frames (\(frames.map(\.readableBytes))), error \(failure.map { "\($0.code)" } ?? "none")"
    }
}

/// Frames an outgoing payload as the pipeline's `FrameEncoder` does; a payload that cannot be built or
/// framed is dropped, as a failed write is.
func send(_ payload: @autoclosure () throws(WireError) -> ByteBuffer) {
    var out = ByteBuffer()
    do {
        try FrameEncoder().encode(data: try payload(), out: &out)
    } catch {
        return
    }
}

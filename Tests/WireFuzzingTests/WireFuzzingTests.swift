import ClusterWire
import Foundation
import NIOCore
import Testing
import WireFuzzing

@Suite("Wire fuzzing harness and seed corpus")
struct WireFuzzingTests {
    /// `Fuzz/Corpus/` of this checkout.
    static let corpus = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/Corpus")

    /// Every body type of the Envelope, found without a list to keep up: an Envelope whose only field
    /// is number n holding an empty message parses with a body exactly when n is a body's field
    /// number; `OneOf_Body.name`, a switch the compiler keeps exhaustive, names it.
    static let bodyNames: Set<String> = {
        var names: Set<String> = []
        // Field numbers 19000...19999 are reserved by protobuf; none of ours comes near.
        for number in 1..<19_000 {
            var frame = ByteBuffer()
            var tag = UInt64(number) << 3 | 2
            while tag >= 0x80 {
                frame.writeInteger(UInt8(truncatingIfNeeded: tag) | 0x80)
                tag >>= 7
            }
            frame.writeInteger(UInt8(tag))
            frame.writeInteger(UInt8(0))
            if let body = try? Tessera_V1_Envelope(frame: frame).body { names.insert(body.name) }
        }
        return names
    }()

    static func run(_ bytes: [UInt8]) -> [WireError] {
        bytes.withUnsafeBytes { WireFuzzing.receive($0) }
    }

    @Test("the seed corpus has a frame of every body type, each named after it")
    func seedsCoverEveryBody() throws {
        #expect(Self.bodyNames.count >= 27)
        let seeds = WireFuzzing.seedCorpus()
        var covered: Set<String> = []
        for seed in seeds where seed.name != "stream" {
            var buffer = ByteBuffer(bytes: seed.bytes)
            let length = buffer.readInteger(as: UInt32.self)
            #expect(length.map(Int.init) == buffer.readableBytes, "\(seed.name) is one frame")
            let body = try #require(try Tessera_V1_Envelope(frame: buffer).body)
            #expect(seed.name == body.name || seed.name.hasPrefix("\(body.name)-"))
            covered.insert(body.name)
        }
        #expect(covered == Self.bodyNames)
        #expect(Set(seeds.map(\.name)).count == seeds.count, "seed names are unique file names")
    }

    @Test("every seed passes every check, so mutations start from the deepest paths")
    func seedsAreValid() {
        for seed in WireFuzzing.seedCorpus() {
            let answered = Self.run(seed.bytes)
            #expect(answered.isEmpty, "\(seed.name): \(answered)")
        }
    }

    /// `TESSERA_WRITE_FUZZ_CORPUS=1` (what `scripts/fuzz.sh seed` sets) first rewrites `Fuzz/Corpus/`
    /// from `seedCorpus()`.
    @Test("Fuzz/Corpus holds exactly the seed corpus, and every file runs through the harness")
    func committedCorpus() throws {
        let files = FileManager.default
        let seeds = WireFuzzing.seedCorpus()
        if ProcessInfo.processInfo.environment["TESSERA_WRITE_FUZZ_CORPUS"] == "1" {
            try? files.removeItem(at: Self.corpus)
            try files.createDirectory(at: Self.corpus, withIntermediateDirectories: true)
            for seed in seeds {
                try Data(seed.bytes).write(to: Self.corpus.appendingPathComponent(seed.name))
            }
        }
        let committed = try files.contentsOfDirectory(atPath: Self.corpus.path)
        #expect(Set(committed) == Set(seeds.map(\.name)), "regenerate with scripts/fuzz.sh seed")
        for seed in seeds {
            let bytes = try? Data(contentsOf: Self.corpus.appendingPathComponent(seed.name))
            #expect(bytes.map(Array.init) == seed.bytes, "\(seed.name) is stale; regenerate with scripts/fuzz.sh seed")
        }
        for name in committed {
            _ = Self.run(Array(try Data(contentsOf: Self.corpus.appendingPathComponent(name))))
        }
    }

    /// What the fuzzer found, kept: each input once trapped (an overflowing sum of figures a peer
    /// reports); now each must run through like any other.
    @Test("every crash input the fuzzer found runs through")
    func crashInputsRunThrough() throws {
        let crashes = Self.corpus.deletingLastPathComponent().appendingPathComponent("Crashes")
        let found = try FileManager.default.contentsOfDirectory(atPath: crashes.path)
        #expect(!found.isEmpty)
        for name in found {
            _ = Self.run(Array(try Data(contentsOf: crashes.appendingPathComponent(name))))
        }
    }

    @Test(
        "broken streams are answered with errors",
        arguments: [
            ("empty", [UInt8]()),
            ("zero-length frame", [0, 0, 0, 0]),
            ("frame above the limit", [0xFF, 0xFF, 0xFF, 0xFF, 1]),
            ("stream ends inside a header", [0, 0]),
            ("stream ends inside a payload", [0, 0, 0, 9, 1, 2]),
            ("payload that is not an Envelope", [0, 0, 0, 3, 0xFF, 0xFF, 0xFF]),
            ("Envelope without a body", [0, 0, 0, 2, 0x08, 0x07]),
        ]
    )
    func brokenStreams(name: String, bytes: [UInt8]) {
        let answered = Self.run(bytes)
        #expect(answered.count == (name == "empty" ? 0 : 1), "\(answered)")
    }

    /// The harness traps when a cut stream frames differently from the whole one.
    @Test("a stream cut anywhere frames as it does whole")
    func cutsAnywhere() {
        let stream = WireFuzzing.seedCorpus().first { $0.name == "stream" }!.bytes
        // The last byte chooses the cut; vary it over every value.
        for last in UInt8.min...UInt8.max {
            _ = Self.run(stream.dropLast() + [last])
        }
    }
}

import KVCacheCore
import Testing
import Workloads

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Workload files: the shipped ones parse, every rule has a message naming its field, the mix draw
/// is deterministic, and the prompt-shape knobs reach the layouts without disturbing the defaults.
@Suite struct WorkloadFileTests {
    /// `cluster/workloads/` of this package, found from this file.
    static let workloads: String = {
        let file = #filePath
        return String(file[..<file.lastIndex(of: "/")!]) + "/../../cluster/workloads/"
    }()

    /// A valid file with every key, each away from its default; tests replace one line to break it.
    static let full = """
        name: custom
        model: qwen2.5-vl-7b
        tokensPerImage: 324
        mix:
          - preset: image-qa
            weight: 2
          - preset: multi-image
            weight: 1
        imagesPerRequest: {min: 2, max: 3}
        framesPerVideo: {min: 5, max: 9}
        documentTextTokens: {min: 300, max: 400}
        textScale: 0.5
        decodeTokens: 7
        arrival:
          process: poisson
          rate: 2.5
        """

    static func shares(_ pairs: [(WorkloadPreset, Double)]) -> [WorkloadFile.Share] {
        pairs.map { WorkloadFile.Share(preset: $0.0, weight: $0.1) }
    }

    // MARK: Shipped files

    @Test func mixedFileIsTheBuiltInPreset() throws {
        let file = try WorkloadFile.load(path: Self.workloads + "mixed.yaml")
        #expect(file == WorkloadFile(preset: .mixed, geometry: .llava16Mistral7b))
        #expect(file.mix == Self.shares(WorkloadPreset.mixtureWeights.map { ($0.preset, $0.weight) }))
        #expect(file.traceSettings == .defaults)
        #expect(file.arrival == .closed(concurrency: 4))
    }

    @Test func videoHeavyFile() throws {
        let file = try WorkloadFile.load(path: Self.workloads + "video-heavy.yaml")
        #expect(file.name == "video-heavy")
        #expect(file.geometry == .llava16Mistral7b)
        #expect(file.mix == Self.shares([(.video, 0.7), (.imageQA, 0.2), (.multiImage, 0.1)]))
        var expected = TraceSettings.defaults
        expected.framesPerVideo = 24...48
        #expect(file.traceSettings == expected)
        #expect(file.arrival == .poisson(ratePerSecond: 1))
    }

    @Test func longDocumentFile() throws {
        let file = try WorkloadFile.load(path: Self.workloads + "long-document.yaml")
        #expect(file.name == "long-document")
        #expect(file.mix == Self.shares([(.document, 0.8), (.imageQA, 0.2)]))
        var expected = TraceSettings.defaults
        expected.documentTextTokens = 2048...6144
        expected.decodeSteps = 64
        #expect(file.traceSettings == expected)
        #expect(file.arrival == .closed(concurrency: 2))
    }

    @Test func missingFileNamesThePath() {
        let path = Self.workloads + "no-such-workload.yaml"
        let error = #expect(throws: WorkloadError.self) { try WorkloadFile.load(path: path) }
        #expect(error?.code == .invalidFile)
        #expect(error?.message == "\(path): cannot read workload file: no such file")
    }

    // MARK: Values

    @Test func everyKeyReachesItsValue() throws {
        let file = try WorkloadFile.parse(yaml: Self.full, source: "full.yaml")
        #expect(file.name == "custom")
        var geometry = ModelGeometry.qwen25VL7b
        geometry.tokensPerImage = 324
        #expect(file.geometry == geometry)
        #expect(file.mix == Self.shares([(.imageQA, 2), (.multiImage, 1)]))
        var settings = TraceSettings.defaults
        settings.imagesPerRequest = 2...3
        settings.framesPerVideo = 5...9
        settings.documentTextTokens = 300...400
        settings.textScale = 0.5
        settings.decodeSteps = 7
        #expect(file.traceSettings == settings)
        #expect(file.arrival == .poisson(ratePerSecond: 2.5))
    }

    @Test func onlyNameAndMixAreRequired() throws {
        let file = try WorkloadFile.parse(
            yaml: "name: small\nmix:\n  - {preset: video, weight: 1}\nmodel: ~\n",
            source: "small.yaml"
        )
        #expect(file == WorkloadFile(preset: .video, geometry: .llava16Mistral7b).renamed("small"))
    }

    // MARK: Rules

    /// A broken file, the substrings its message must contain (besides the source name).
    struct Broken: Sendable, CustomTestStringConvertible {
        var label: String
        var yaml: String
        var expected: [String]
        var testDescription: String { label }
    }

    static func replacing(_ line: String, with replacement: String) -> String {
        precondition(full.contains(line), "the fixture has no line '\(line)'")
        return full.replacing(line, with: replacement)
    }

    static let broken: [Broken] = [
        Broken(
            label: "unknown preset",
            yaml: replacing("preset: multi-image", with: "preset: multi-imgae"),
            expected: ["mix[1].preset", "multi-imgae", "allowed: image-qa, multi-image, video, document"]
        ),
        Broken(
            label: "mixed inside mix",
            yaml: replacing("preset: multi-image", with: "preset: mixed"),
            expected: ["mix[1].preset", "'mixed' is itself a mix", "allowed: image-qa"]
        ),
        Broken(
            label: "duplicate preset",
            yaml: replacing("preset: multi-image", with: "preset: image-qa"),
            expected: ["mix[1].preset", "already appears in mix[0]"]
        ),
        Broken(
            label: "empty mix",
            yaml: "name: x\nmix: []\n",
            expected: ["mix must list at least one preset"]
        ),
        Broken(label: "missing mix", yaml: "name: x\n", expected: ["mix is required"]),
        Broken(label: "missing name", yaml: "mix:\n  - {preset: video, weight: 1}\n", expected: ["name is required"]),
        Broken(
            label: "non-positive weight",
            yaml: replacing("weight: 2", with: "weight: 0"),
            expected: ["mix[0].weight", "> 0", "got 0"]
        ),
        Broken(
            label: "non-finite weight",
            yaml: replacing("weight: 2", with: "weight: .nan"),
            expected: ["mix[0].weight", "finite"]
        ),
        Broken(
            label: "unknown key in arrival",
            yaml: replacing("rate: 2.5", with: "rate: 2.5\n  concurency: 3"),
            expected: ["unknown key 'concurency' in arrival; allowed: process, concurrency, rate"]
        ),
        Broken(
            label: "unknown key at the top",
            yaml: replacing("textScale: 0.5", with: "textscale: 0.5"),
            expected: ["unknown key 'textscale'", "allowed: name, model", "textScale"]
        ),
        Broken(
            label: "unknown key in a range",
            yaml: replacing("{min: 2, max: 3}", with: "{min: 2, mx: 3}"),
            expected: ["unknown key 'mx' in imagesPerRequest; allowed: min, max"]
        ),
        Broken(
            label: "range out of bounds",
            yaml: replacing("{min: 2, max: 3}", with: "{min: 0, max: 3}"),
            expected: ["imagesPerRequest", "1...64", "got 0...3"]
        ),
        Broken(
            label: "frames out of bounds",
            yaml: replacing("{min: 5, max: 9}", with: "{min: 5, max: 300}"),
            expected: ["framesPerVideo", "1...256"]
        ),
        Broken(
            label: "min above max",
            yaml: replacing("{min: 300, max: 400}", with: "{min: 400, max: 300}"),
            expected: ["documentTextTokens", "min (400) must not exceed max (300)"]
        ),
        Broken(
            label: "range without max",
            yaml: replacing("{min: 5, max: 9}", with: "{min: 5}"),
            expected: ["framesPerVideo.max is required"]
        ),
        Broken(
            label: "zero rate",
            yaml: replacing("rate: 2.5", with: "rate: 0"),
            expected: ["arrival.rate", "(0, 10000]", "got 0"]
        ),
        Broken(
            label: "negative rate",
            yaml: replacing("rate: 2.5", with: "rate: -1"),
            expected: ["arrival.rate"]
        ),
        Broken(
            label: "poisson without rate",
            yaml: replacing("  rate: 2.5", with: ""),
            expected: ["arrival.rate is required"]
        ),
        Broken(
            label: "concurrency out of bounds",
            yaml: replacing("process: poisson\n  rate: 2.5", with: "process: closed\n  concurrency: 0"),
            expected: ["arrival.concurrency", "1...1024", "got 0"]
        ),
        Broken(
            label: "concurrency with poisson",
            yaml: replacing("rate: 2.5", with: "rate: 2.5\n  concurrency: 2"),
            expected: ["arrival.concurrency", "only allowed with process: closed"]
        ),
        Broken(
            label: "unknown process",
            yaml: replacing("process: poisson", with: "process: burst"),
            expected: ["arrival.process", "closed, poisson", "burst"]
        ),
        Broken(
            label: "not a number",
            yaml: replacing("rate: 2.5", with: "rate: fast"),
            expected: ["arrival.rate must be a number", "fast"]
        ),
        Broken(
            label: "not an integer",
            yaml: replacing("decodeTokens: 7", with: "decodeTokens: 7.5"),
            expected: ["decodeTokens must be an integer"]
        ),
        Broken(
            label: "decodeTokens zero",
            yaml: replacing("decodeTokens: 7", with: "decodeTokens: 0"),
            expected: ["decodeTokens", "1...4096", "got 0"]
        ),
        Broken(
            label: "textScale",
            yaml: replacing("textScale: 0.5", with: "textScale: 40"),
            expected: ["textScale", "(0, 16]"]
        ),
        Broken(
            label: "unknown model",
            yaml: replacing("model: qwen2.5-vl-7b", with: "model: gpt-9"),
            expected: ["model", "gpt-9", "allowed: llava-1.5-7b"]
        ),
        Broken(
            label: "tokensPerImage",
            yaml: replacing("tokensPerImage: 324", with: "tokensPerImage: 0"),
            expected: ["tokensPerImage", "1...16384"]
        ),
        Broken(
            label: "mix not a list",
            yaml: "name: x\nmix: video\n",
            expected: ["mix must be a list"]
        ),
        Broken(label: "not a mapping", yaml: "- a\n- b\n", expected: ["must be a mapping"]),
        Broken(label: "empty file", yaml: "# nothing\n", expected: ["empty"]),
        Broken(
            label: "malformed YAML",
            yaml: replacing("  - preset: multi-image", with: "  - preset: [multi-image"),
            expected: ["invalid YAML"]
        ),
        Broken(
            label: "duplicate key",
            yaml: replacing("decodeTokens: 7", with: "decodeTokens: 7\ndecodeTokens: 8"),
            expected: ["invalid YAML", "duplicate key decodeTokens"]
        ),
    ]

    @Test(arguments: broken)
    func brokenFilesNameTheFileAndField(_ broken: Broken) {
        let error = #expect(throws: WorkloadError.self, "\(broken.label)") {
            try WorkloadFile.parse(yaml: broken.yaml, source: "broken.yaml")
        }
        #expect(error?.code == .invalidFile)
        let message = error?.message ?? ""
        #expect(message.hasPrefix("broken.yaml"), "\(broken.label): '\(message)' does not name the file")
        for expected in broken.expected {
            #expect(message.contains(expected), "\(broken.label): '\(message)' lacks '\(expected)'")
        }
    }

    @Test func messagesCarryTheLineAndColumn() throws {
        let malformed = Self.replacing("  - preset: multi-image", with: "  - preset: [multi-image")
        let syntax = #expect(throws: WorkloadError.self) { try WorkloadFile.parse(yaml: malformed, source: "f.yaml") }
        #expect(syntax?.message.contains(#/^f\.yaml:\d+:\d+: /#) == true, "\(syntax?.message ?? "")")
        // The bad weight sits on line 6, after `weight: ` (column 13).
        let badWeight = Self.replacing("weight: 2", with: "weight: -2")
        let field = #expect(throws: WorkloadError.self) { try WorkloadFile.parse(yaml: badWeight, source: "f.yaml") }
        #expect(field?.message.hasPrefix("f.yaml:6:13: mix[0].weight") == true, "\(field?.message ?? "")")
    }

    // MARK: Mix draws

    @Test func presetDrawsAreDeterministicAndFollowTheWeights() throws {
        let file = try WorkloadFile.load(path: Self.workloads + "video-heavy.yaml")
        let seed: UInt64 = 2024
        let draws = (0..<2000).map { file.preset(forSequence: $0, seed: seed) }
        #expect(draws == (0..<2000).map { file.preset(forSequence: $0, seed: seed) })
        #expect(draws != (0..<2000).map { file.preset(forSequence: $0, seed: seed + 1) })
        let total = file.mix.reduce(0) { $0 + $1.weight }
        for share in file.mix {
            let drawn = Double(draws.count(where: { $0 == share.preset })) / Double(draws.count)
            #expect(
                abs(drawn - share.weight / total) < 0.04,
                "seed \(seed): \(share.preset.rawValue) drawn \(drawn), weight \(share.weight)"
            )
        }
    }

    @Test func weightsAreNormalised() {
        var file = WorkloadFile(preset: .imageQA, geometry: .tiny)
        file.mix = Self.shares([(.video, 30), (.document, 10)])
        let draws = (0..<2000).map { file.preset(forSequence: $0, seed: 7) }
        let videos = Double(draws.count(where: { $0 == .video })) / 2000
        #expect(abs(videos - 0.75) < 0.04, "seed 7: video drawn \(videos)")
        #expect(Set(draws) == [.video, .document])
        let single = WorkloadFile(preset: .document, geometry: .tiny)
        #expect((0..<50).allSatisfy { single.preset(forSequence: $0, seed: 7) == .document })
    }

    // MARK: Prompt shapes

    @Test func rangesShapeTheLayouts() {
        var settings = TraceSettings.defaults
        settings.imagesPerRequest = 2...2
        settings.framesPerVideo = 3...5
        settings.documentTextTokens = 100...100
        let multi = TraceGenerator(preset: .multiImage, geometry: .tiny, settings: settings, seed: 11)
        let video = TraceGenerator(preset: .video, geometry: .tiny, settings: settings, seed: 11)
        let document = TraceGenerator(preset: .document, geometry: .tiny, settings: settings, seed: 11)
        var frameCounts = Set<Int>()
        for index in 0..<20 {
            let images = multi.sequence(index).layout.spans.filter(\.modality.isVisual)
            #expect(images.map(\.modality) == [.image(0), .image(1)], "seed 11 #\(index)")
            let frames = video.sequence(index).layout.spans.filter(\.modality.isVisual).count
            #expect((3...5).contains(frames), "seed 11 #\(index): \(frames) frames")
            frameCounts.insert(frames)
            #expect(document.sequence(index).layout.spans[2].count == 100, "seed 11 #\(index)")
        }
        #expect(frameCounts == [3, 4, 5], "seed 11: frame counts drawn \(frameCounts.sorted())")
    }

    @Test func settingsDecodeTheNewKnobsFromJSON() throws {
        let json = #"{"imagesPerRequest": [2, 3], "framesPerVideo": [8, 8], "documentTextTokens": [10, 20]}"#
        let settings = try JSONDecoder().decode(TraceSettings.self, from: Data(json.utf8))
        var expected = TraceSettings.defaults
        expected.imagesPerRequest = 2...3
        expected.framesPerVideo = 8...8
        expected.documentTextTokens = 10...20
        #expect(settings == expected)
        #expect(try JSONDecoder().decode(TraceSettings.self, from: Data("{}".utf8)) == .defaults)
    }

    /// Prompt lengths and a checksum of the last layer's target sparsity (which is drawn after the spans,
    /// so it moves if the planner draws more or less) recorded before the ranges became settings.
    struct Golden: Sendable {
        var preset: WorkloadPreset
        var promptLengths: [Int]
        var checksum: UInt64
    }

    @Test(arguments: [
        Golden(
            preset: .multiImage,
            promptLengths: [4791, 4788, 2995, 4178, 4754, 3581, 4786, 4750, 2387, 2985, 3601, 2386],
            checksum: 0x1d00_54f8_54ab_03bc
        ),
        Golden(
            preset: .video,
            promptLengths: [4239, 2789, 2924, 3943, 3094, 3932, 3534, 2642, 2514, 4100, 4097, 2779],
            checksum: 0x33f7_e205_ba97_6976
        ),
        Golden(
            preset: .document,
            promptLengths: [2478, 1852, 1890, 2381, 2040, 2354, 2231, 1786, 1741, 2413, 2442, 1828],
            checksum: 0x33f7_e205_ba97_6976
        ),
        Golden(
            preset: .mixed,
            promptLengths: [2147, 1830, 623, 4165, 2410, 4172, 2668, 1760, 641, 662, 4206, 621],
            checksum: 0x7f3e_2d60_f573_4d10
        ),
    ])
    func defaultsKeepTheOldLayouts(_ golden: Golden) {
        let generator = TraceGenerator(preset: golden.preset, geometry: .llava16Mistral7b, seed: 42)
        let traces = (0..<12).map { generator.sequence($0) }
        #expect(traces.map(\.promptLength) == golden.promptLengths, "seed 42 \(golden.preset.rawValue)")
        let checksum = traces.reduce(UInt64(0)) { $0 &* 31 &+ $1.targetSparsity.last!.bitPattern }
        #expect(checksum == golden.checksum, "seed 42 \(golden.preset.rawValue)")
    }
}

extension WorkloadFile {
    fileprivate func renamed(_ name: String) -> WorkloadFile {
        var copy = self
        copy.name = name
        return copy
    }
}

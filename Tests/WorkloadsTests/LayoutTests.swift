import KVCacheCore
import Testing
import Workloads

/// Prompt layouts: every preset tiles the prompt with the counts it promises.
@Suite struct LayoutTests {
    static let geometry = ModelGeometry.llava15_7b

    /// Text spans before visual tokens, visual spans and trailing text, read back from a layout.
    struct Shape {
        var visualSpans: [ModalitySpan] = []
        var textSpans: [ModalitySpan] = []

        init(_ layout: PromptLayout) {
            for span in layout.spans {
                if span.modality.isVisual { visualSpans.append(span) } else { textSpans.append(span) }
            }
        }
    }

    @Test(arguments: [UInt64(1), 99])
    func imageQA(seed: UInt64) {
        let generator = TraceGenerator(preset: .imageQA, geometry: Self.geometry, seed: seed)
        for index in 0..<40 {
            let trace = generator.sequence(index)
            let shape = Shape(trace.layout)
            #expect(trace.preset == .imageQA)
            #expect(shape.visualSpans.map(\.modality) == [.image(0)], "seed \(seed) #\(index)")
            #expect(shape.visualSpans.map(\.count) == [576], "seed \(seed) #\(index)")
            #expect(
                shape.textSpans.count == 2 && shape.textSpans.allSatisfy { (16...48).contains($0.count) },
                "seed \(seed) #\(index): text spans \(shape.textSpans.map(\.count))"
            )
            #expect(trace.layout.spans.first?.modality == .text, "position 0 (the sink) must be text")
            #expect(trace.decodeSteps == 32)
        }
    }

    @Test(arguments: [UInt64(2), 77])
    func multiImage(seed: UInt64) {
        let generator = TraceGenerator(preset: .multiImage, geometry: Self.geometry, seed: seed)
        var imageCounts = Set<Int>()
        for index in 0..<60 {
            let trace = generator.sequence(index)
            let spans = trace.layout.spans
            let images = spans.filter(\.modality.isVisual)
            imageCounts.insert(images.count)
            #expect((4...8).contains(images.count), "seed \(seed) #\(index): \(images.count) images")
            #expect(images.map(\.modality) == (0..<images.count).map { .image($0) })
            #expect(images.allSatisfy { $0.count == 576 })
            // Every image is preceded by 8–24 text tokens; the question follows the last one.
            for (i, span) in spans.enumerated() where span.modality.isVisual {
                #expect(
                    i > 0 && spans[i - 1].modality == .text && (8...24).contains(spans[i - 1].count),
                    "seed \(seed) #\(index): span \(i)"
                )
            }
            #expect(spans.last!.modality == .text && (16...48).contains(spans.last!.count))
        }
        #expect(imageCounts.count >= 4, "seed \(seed): image counts drawn \(imageCounts.sorted())")
    }

    @Test(arguments: [UInt64(3), 55])
    func video(seed: UInt64) {
        let generator = TraceGenerator(preset: .video, geometry: Self.geometry, seed: seed)
        for index in 0..<40 {
            let spans = generator.sequence(index).layout.spans
            let frames = spans.filter(\.modality.isVisual)
            #expect((16...32).contains(frames.count), "seed \(seed) #\(index)")
            #expect(frames.map(\.modality) == (0..<frames.count).map { .videoFrame($0) })
            #expect(frames.allSatisfy { $0.count == 144 }, "pooled frames carry tokensPerImage / 4 tokens")
            #expect(spans.first!.modality == .text && (16...32).contains(spans.first!.count))
            #expect(spans.last!.modality == .text && (16...48).contains(spans.last!.count))
            #expect(spans.count == frames.count + 2)
        }
    }

    @Test(arguments: [UInt64(4), 44])
    func document(seed: UInt64) {
        let generator = TraceGenerator(preset: .document, geometry: Self.geometry, seed: seed)
        for index in 0..<40 {
            let trace = generator.sequence(index)
            let spans = trace.layout.spans
            #expect(spans.map(\.modality) == [.text, .image(0), .text, .text], "seed \(seed) #\(index)")
            #expect((16...48).contains(spans[0].count) && spans[1].count == 576)
            #expect((1024...2048).contains(spans[2].count), "long text of \(spans[2].count) tokens")
            #expect((16...48).contains(spans[3].count))
            #expect(trace.needle?.modality == .text, "documents hide a text needle")
        }
    }

    @Test func mixedDrawsEveryPresetByWeight() {
        let seed: UInt64 = 5
        let generator = TraceGenerator(preset: .mixed, geometry: Self.geometry, seed: seed)
        let count = 600
        var tally: [WorkloadPreset: Int] = [:]
        for index in 0..<count {
            let preset = generator.sequence(index).preset
            #expect(preset != .mixed)
            tally[preset, default: 0] += 1
        }
        for (preset, weight) in WorkloadPreset.mixtureWeights {
            let share = Double(tally[preset, default: 0]) / Double(count)
            #expect(abs(share - weight) < 0.06, "seed \(seed): \(preset.rawValue) drawn \(share), weight \(weight)")
        }
    }

    @Test func textScaleShrinksTextOnly() {
        var settings = TraceSettings.defaults
        settings.textScale = 0.1
        let generator = TraceGenerator(preset: .document, geometry: .tiny, settings: settings, seed: 6)
        let spans = generator.sequence(0).layout.spans
        #expect(spans[1].count == 64)
        #expect((102...205).contains(spans[2].count), "long text scaled to \(spans[2].count)")
    }

    @Test func layoutsTileThePrompt() {
        for preset in WorkloadPreset.allCases {
            let generator = TraceGenerator(preset: preset, geometry: .tiny, settings: smallSettings(), seed: 8)
            for index in 0..<20 {
                let layout = generator.sequence(index).layout
                var next = 0
                for span in layout.spans {
                    #expect(span.start == next && span.count > 0)
                    next = span.end
                }
                #expect(next == layout.promptLength && layout.tags.count == next)
                #expect(layout.postVisionStart < layout.promptLength, "\(preset.rawValue): no post-vision text")
            }
        }
    }

    @Test func needlesLieInsideTheirModality() throws {
        for preset in [WorkloadPreset.imageQA, .multiImage, .video, .document] {
            let generator = TraceGenerator(preset: preset, geometry: .tiny, settings: smallSettings(), seed: 9)
            for index in 0..<30 {
                let trace = generator.sequence(index)
                let needle = try #require(trace.needle, "\(preset.rawValue) #\(index) has no needle")
                #expect(!needle.positions.contains(0), "the sink is never part of the needle")
                for position in needle.positions {
                    #expect(
                        trace.layout.tags[position].modality == needle.modality,
                        "\(preset.rawValue) #\(index): position \(position)"
                    )
                }
                if needle.modality.isVisual {
                    #expect([4, 9].contains(needle.positions.count), "a 2×2 or 3×3 block")
                } else {
                    #expect((4...8).contains(needle.positions.count))
                    #expect(needle.positions == Array(needle.positions.first!...needle.positions.last!))
                }
            }
        }
    }

    @Test func presetNamesRoundTripAndUnknownNamesListTheAllowedOnes() throws {
        for preset in WorkloadPreset.allCases {
            #expect(try WorkloadPreset.named(preset.rawValue) == preset)
        }
        let error = #expect(throws: WorkloadError.self) { try WorkloadPreset.named("nope") }
        #expect(error?.code == .unknownPreset)
        for name in ["image-qa", "multi-image", "video", "document", "mixed"] {
            #expect(error?.message.contains(name) == true, "message '\(error?.message ?? "")' lacks \(name)")
        }
        #expect(error?.message.contains("nope") == true)
    }

    @Test func invalidSettingsAreRejectedWithTheirName() {
        var settings = TraceSettings.defaults
        settings.decodeAgreement = 1.5
        let error = #expect(throws: WorkloadError.self) { try settings.validate() }
        #expect(error?.code == .invalidSetting)
        #expect(error?.message.contains("decodeAgreement") == true)
        #expect(throws: Never.self) { try TraceSettings.defaults.validate() }
    }
}

package import Workloads

extension TraceSettings {
    /// The generator's defaults with a workload file's prompt-shape knobs from the wire.
    package init(shape: Tessera_V1_TraceShape) throws(WireError) {
        self.init()
        textScale = shape.textScale
        decodeSteps = Int(shape.decodeSteps)
        imagesPerRequest = try Self.range(shape.imagesMin, shape.imagesMax, "images")
        framesPerVideo = try Self.range(shape.framesMin, shape.framesMax, "frames")
        documentTextTokens = try Self.range(shape.documentTextMin, shape.documentTextMax, "document_text")
        do {
            try validate()
        } catch {
            throw WireError(.badRequest, "prefill.synthetic.shape: \(error.message)")
        }
    }

    private static func range(_ low: UInt32, _ high: UInt32, _ name: String) throws(WireError) -> ClosedRange<Int> {
        guard low <= high else {
            throw WireError(.badRequest, "prefill.synthetic.shape.\(name)_min (\(low)) exceeds \(name)_max (\(high))")
        }
        return Int(low)...Int(high)
    }

    /// The prompt-shape knobs of these settings, for a synthetic prefill.
    package var shape: Tessera_V1_TraceShape {
        var shape = Tessera_V1_TraceShape()
        shape.textScale = textScale
        shape.decodeSteps = UInt32(decodeSteps)
        shape.imagesMin = UInt32(imagesPerRequest.lowerBound)
        shape.imagesMax = UInt32(imagesPerRequest.upperBound)
        shape.framesMin = UInt32(framesPerVideo.lowerBound)
        shape.framesMax = UInt32(framesPerVideo.upperBound)
        shape.documentTextMin = UInt32(documentTextTokens.lowerBound)
        shape.documentTextMax = UInt32(documentTextTokens.upperBound)
        return shape
    }
}

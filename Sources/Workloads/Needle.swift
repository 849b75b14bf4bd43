public import KVCacheCore

/// One decode step at which one retrieval head is expected to read the needle.
public struct NeedleProbe: Sendable, Hashable, Codable {
    public let layer: Int
    public let queryHead: Int
    public let step: Int

    public init(layer: Int, queryHead: Int, step: Int) {
        self.layer = layer
        self.queryHead = queryHead
        self.step = step
    }
}

/// A fact planted in the prompt: a patch block of one image or frame, or a short text span. In the
/// KV heads of the retrieval heads, the needle's keys share a direction the retrieval queries look
/// for, and its values carry `code(answer)`; a head output that attends to the needle decodes to
/// `answer`. A cache that dropped the needle decodes to noise.
public struct Needle: Sendable, Hashable {
    /// The needle's prompt positions, ascending. An image block is not contiguous in the prompt.
    public let positions: [Int]
    /// The modality of the span holding the needle.
    public let modality: Modality
    /// The index of the planted code.
    public let answer: Int
    /// How many codes there are to choose from.
    public let answerCount: Int
    /// `answerCount × headDim` unit rows (orthonormal when `answerCount ≤ headDim`).
    public let codebook: [Float]
    public let headDim: Int
    /// Every (retrieval head, decode step) that should read the needle.
    public let probes: [NeedleProbe]

    public init(
        positions: [Int],
        modality: Modality,
        answer: Int,
        answerCount: Int,
        codebook: [Float],
        headDim: Int,
        probes: [NeedleProbe]
    ) {
        precondition(codebook.count == answerCount * headDim, "codebook must hold answerCount × headDim floats")
        precondition((0..<answerCount).contains(answer), "answer must index the codebook")
        self.positions = positions
        self.modality = modality
        self.answer = answer
        self.answerCount = answerCount
        self.codebook = codebook
        self.headDim = headDim
        self.probes = probes
    }

    /// The unit code of answer `index`.
    public func code(_ index: Int) -> ArraySlice<Float> { codebook[index * headDim..<(index + 1) * headDim] }

    /// The answer whose code has the largest dot product with a head output of `headDim` floats.
    public func decodeAnswer(output: UnsafeBufferPointer<Float>) -> Int {
        precondition(output.count == headDim, "a head output has headDim = \(headDim) floats, got \(output.count)")
        var best = 0
        var bestScore = -Float.infinity
        codebook.withUnsafeBufferPointer { codes in
            for index in 0..<answerCount {
                var score: Float = 0
                let base = index * headDim
                for c in 0..<headDim { score += codes[base + c] * output[c] }
                if score > bestScore {
                    bestScore = score
                    best = index
                }
            }
        }
        return best
    }

    public func decodeAnswer(output: [Float]) -> Int {
        output.withUnsafeBufferPointer { decodeAnswer(output: $0) }
    }
}

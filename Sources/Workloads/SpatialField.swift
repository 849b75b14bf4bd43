/// Growable scratch memory for one layer's expansion, one region per use, so the hot loops work on
/// raw pointers and allocate nothing per element. A pointer stays valid until its own region is
/// requested again with a larger count.
final class ScratchBuffers {
    enum Region: Int, CaseIterable {
        case contentNoise, reservedNoise, field, previousFrame, fieldNoise, horizontalPass
    }

    private var pointers: [UnsafeMutablePointer<Float>?] = Array(repeating: nil, count: Region.allCases.count)
    private var capacities = [Int](repeating: 0, count: Region.allCases.count)

    func buffer(_ region: Region, count: Int) -> UnsafeMutablePointer<Float> {
        let slot = region.rawValue
        if let pointer = pointers[slot], capacities[slot] >= count { return pointer }
        pointers[slot]?.deallocate()
        let pointer = UnsafeMutablePointer<Float>.allocate(capacity: max(count, 1))
        pointers[slot] = pointer
        capacities[slot] = max(count, 1)
        return pointer
    }

    deinit {
        for pointer in pointers { pointer?.deallocate() }
    }
}

/// Smooth random fields over an image's patch grid: white noise on the grid, blurred by the
/// separable binomial kernel [1 4 6 4 1] (truncated at the border) and scaled to unit variance cell
/// by cell. Adjacent interior cells correlate at 56/70 = 0.8 (a little more at the border): the
/// spatial redundancy that makes neighbouring patches, and their keys and values, similar.
enum SpatialField {
    /// Writes `tokens × dims` floats (token-major, row-major over the grid) to `field`.
    static func generate(
        tokens: Int,
        dims: Int,
        stream: inout NormalStream,
        scratch: ScratchBuffers,
        into field: UnsafeMutablePointer<Float>
    ) {
        let (width, height) = PromptPlanner.grid(tokens: tokens)
        // The noise sits inside a two-cell border of zeros, so the blur needs no bounds checks and
        // border cells simply get fewer taps.
        let paddedWidth = width + 4
        let paddedHeight = height + 4
        let padded = scratch.buffer(.fieldNoise, count: paddedHeight * paddedWidth * dims)
        padded.update(repeating: 0, count: paddedHeight * paddedWidth * dims)
        for y in 0..<height {
            stream.fill(padded + ((y + 2) * paddedWidth + 2) * dims, count: width * dims)
        }
        let horizontal = scratch.buffer(.horizontalPass, count: paddedHeight * width * dims)
        for y in 0..<paddedHeight {
            for x in 0..<width {
                let out = horizontal + (y * width + x) * dims
                let a = padded + (y * paddedWidth + x) * dims
                let b = a + dims
                let c = b + dims
                let e = c + dims
                let f = e + dims
                for k in 0..<dims { out[k] = a[k] + 4 * b[k] + 6 * c[k] + 4 * e[k] + f[k] }
            }
        }
        // Σ w² of the taps that fall inside the grid: the variance a pass leaves at that index.
        func tapEnergy(_ index: Int, _ size: Int) -> Float {
            let weights: [Float] = [1, 4, 6, 4, 1]
            var energy: Float = 0
            for k in -2...2 where (0..<size).contains(index + k) { energy += weights[k + 2] * weights[k + 2] }
            return energy
        }
        let columnEnergy = (0..<width).map { tapEnergy($0, width) }
        let rowEnergy = (0..<height).map { tapEnergy($0, height) }
        let rowStride = width * dims
        for y in 0..<height {
            for x in 0..<width where y * width + x < tokens {
                let out = field + (y * width + x) * dims
                let a = horizontal + y * rowStride + x * dims
                let b = a + rowStride
                let c = b + rowStride
                let e = c + rowStride
                let f = e + rowStride
                let scale = 1 / (columnEnergy[x] * rowEnergy[y]).squareRoot()
                for k in 0..<dims { out[k] = scale * (a[k] + 4 * b[k] + 6 * c[k] + 4 * e[k] + f[k]) }
            }
        }
    }
}

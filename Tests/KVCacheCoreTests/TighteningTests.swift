import KVCacheCore
import Testing

@Suite struct TighteningTests {
    /// Six prompt rows scored at compression, then two decoded rows: cutting to three prompt rows keeps
    /// the three best-scored ones with their bytes, and both decoded rows.
    @Test func keepsTheBestScoredPromptRowsAndEveryDecodedRow() {
        var head = HeadCache<Float>(headDim: 2)
        for p in 0..<8 {
            let tag = p < 6 ? ModalityTag(.image(0)) : ModalityTag.text
            let key: [Float] = [Float(p), -Float(p)]
            let value: [Float] = [Float(10 * p), 1]
            head.append(key: key, value: value, position: p, tag: tag)
        }
        let scores: [Float] = [.infinity, 1, 5, 2, 4, 3]
        let cut = head.tightened(promptLength: 6, capacity: 3, scores: scores)
        #expect(cut.cache.positions == [0, 2, 4, 6, 7])
        #expect(cut.cache.keys == [0, 0, 2, -2, 4, -4, 6, -6, 7, -7])
        #expect(cut.cache.values == [0, 1, 20, 1, 40, 1, 60, 1, 70, 1])
        #expect(cut.scores == [.infinity, 5, 4])
        #expect(cut.cache.payloadBytes == 5 * 2 * 2 * 4)
        // Tightening again to the same capacity changes nothing; a larger one never grows the cache.
        let again = cut.cache.tightened(promptLength: 6, capacity: 3, scores: cut.scores)
        #expect(again.cache.positions == cut.cache.positions)
        let looser = head.tightened(promptLength: 6, capacity: 10, scores: scores)
        #expect(looser.cache.count == 8 && looser.scores == scores)
    }
}

@Suite struct HeadRowSharesTests {
    /// A head's share counts its prompt rows only: two heads of a 10-position prompt keeping 2 and 5
    /// of them, the first with 3 decoded rows besides, spread from 20% to 50%.
    @Test func countsPromptRowsOfEveryHead() throws {
        func head(_ positions: [Int]) -> HeadCache<Float> {
            var head = HeadCache<Float>(headDim: 1)
            for p in positions { head.append(key: [0], value: [0], position: p, tag: .text) }
            return head
        }
        let heads = [head([0, 9, 10, 11, 12]), head([0, 1, 2, 3, 4])]
        let shares = try #require(HeadRowShares(heads: heads, promptLength: 10))
        #expect(shares == HeadRowShares(min: 0.2, max: 0.5))
        // Merging two layers keeps the smaller minimum and the larger maximum.
        let other = HeadRowShares(min: 0.3, max: 0.9)
        #expect(shares.merged(with: other) == HeadRowShares(min: 0.2, max: 0.9))
        #expect(HeadRowShares?.none.merged(with: other) == other)
        #expect(HeadRowShares(heads: [HeadCache<Float>](), promptLength: 10) == nil)
        #expect(HeadRowShares(heads: heads, promptLength: 0) == nil)
    }
}

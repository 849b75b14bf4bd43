import ClusterWire
import NIOCore
import Testing

/// Incomplete large frames reserve their length from a budget the process's connections share.
@Suite struct FrameBudgetTests {
    /// A frame header for `length` bytes and the first `sent` bytes of its payload.
    static func partial(length: Int, sent: Int) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(UInt32(length), endianness: .big)
        buffer.writeRepeatingByte(7, count: sent)
        return buffer
    }

    @Test func largeIncompleteFramesShareTheBudget() throws {
        let budget = FrameBudget(limit: 1 << 20)
        var first = FrameDecoder(maxFrameBytes: 4 << 20, budget: budget)
        var firstBytes = Self.partial(length: 800 << 10, sent: 1000)
        #expect(try first.decode(buffer: &firstBytes) == nil)
        #expect(budget.available == (1 << 20) - (800 << 10))

        // A second connection's frame does not fit while the first is incomplete.
        var second = FrameDecoder(maxFrameBytes: 4 << 20, budget: budget)
        var secondBytes = Self.partial(length: 400 << 10, sent: 10)
        #expect {
            try second.decode(buffer: &secondBytes)
        } throws: { ($0 as? WireError)?.code == .resourceExhausted }

        // Small frames are not counted.
        var small = FrameDecoder(maxFrameBytes: 4 << 20, budget: budget)
        var smallBytes = Self.partial(length: 1000, sent: 10)
        #expect(try small.decode(buffer: &smallBytes) == nil)

        // The first frame completes and gives its bytes back; now the second fits.
        firstBytes.writeRepeatingByte(7, count: (800 << 10) - 1000)
        #expect(try first.decode(buffer: &firstBytes)?.readableBytes == 800 << 10)
        #expect(budget.available == 1 << 20)
        secondBytes.moveReaderIndex(to: 0)
        #expect(try second.decode(buffer: &secondBytes) == nil)
        #expect(budget.available == (1 << 20) - (400 << 10))
    }
}

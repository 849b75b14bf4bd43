import ClusterTransport
import Testing

@testable import Client

/// The client's placements and the requests waiting for one to move (what replaced asking the
/// coordinator every second for every request in flight), without sockets.
struct PlacementBookTests {
    static func placement(_ id: UInt64, epoch: UInt64, primaryPort: Int = 1) -> SequencePlacement {
        SequencePlacement(
            sequenceID: id,
            epoch: epoch,
            shards: [
                .init(id: 0, layers: 0..<4, primary: NodeAddress(host: "127.0.0.1", port: primaryPort), replicas: [])
            ]
        )
    }

    @Test func theNewestEpochIsKept() {
        let book = PlacementBook()
        book.remember(Self.placement(7, epoch: 2))
        #expect(book.remember(Self.placement(7, epoch: 1)).epoch == 2, "an older placement arriving late is ignored")
        #expect(book.remember(Self.placement(7, epoch: 3, primaryPort: 2)).shards[0].primary.port == 2)
        #expect(book.placement(7)?.epoch == 3 && book.sequenceIDs == [7])
        book.forget(7)
        #expect(book.placement(7) == nil && book.sequenceIDs.isEmpty)
    }

    @Test func aWaitingRequestWakesWhenItsSequenceMoves() async {
        let book = PlacementBook()
        book.remember(Self.placement(7, epoch: 2))
        book.remember(Self.placement(8, epoch: 5))
        await withTaskGroup(of: String.self) { group in
            group.addTask {
                await book.waitForMove(of: 7, from: 2)
                return "moved"
            }
            // Other sequences' pushes and a push at the same epoch do not wake it.
            book.remember(Self.placement(8, epoch: 6))
            book.remember(Self.placement(7, epoch: 2))
            // The waiter may register before or after this push: either way it returns.
            book.remember(Self.placement(7, epoch: 3))
            #expect(await group.next() == "moved")
        }
        // Already newer than the request's epoch: returns at once.
        await book.waitForMove(of: 7, from: 1)
    }

    @Test func closingOrCancellingEndsTheWait() async {
        let book = PlacementBook()
        book.remember(Self.placement(7, epoch: 2))
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await book.waitForMove(of: 7, from: 2) }
            book.forget(7)
            await group.next()
        }
        book.remember(Self.placement(9, epoch: 1))
        let waiting = Task { await book.waitForMove(of: 9, from: 1) }
        waiting.cancel()
        await waiting.value
        // A sequence the client does not know has nothing to wait for.
        await book.waitForMove(of: 10, from: 0)
    }
}

/// How the client cuts a shard's layers into prefill parts.
struct PrefillPartsTests {
    @Test func aShardsLayersGoInRunsOfAtMostThePartSize() {
        #expect(TesseraClient.parts(of: 4..<11, layersPerPart: 3) == [4..<7, 7..<10, 10..<11])
        #expect(TesseraClient.parts(of: 4..<11, layersPerPart: .max) == [4..<11], "one part: no overflow")
        #expect(TesseraClient.parts(of: 4..<6, layersPerPart: 0) == [4..<5, 5..<6], "at least a layer a part")
        #expect(TesseraClient.parts(of: 3..<3, layersPerPart: 2) == [3..<3], "a shard without layers: one request")
    }
}

import ClusterWire
import Foundation
import KVCacheCore
import Synchronization
import Testing

@testable import Worker

#if canImport(Glibc)
import Glibc
#endif

/// The worker state's rules the coordinator relies on: a copy follows its sequence's epoch (the
/// coordinator takes layer statistics only at the current one, so a copy that moves before it is
/// compressed reports again), and decode stays within the steps admission charged.
struct WorkerStateTests {
    /// Sequence 7's shard as `ShardTransferTests.shard` builds it (epoch 3), before compression, with
    /// the statistics its prefill produced at that epoch.
    static func prefilled() throws -> HeldSequence {
        var held = try ShardTransferTests.shard(storage: .float32)
        held.cache = nil
        held.statistics = (0..<2).map { layer in
            var statistics = Tessera_V1_LayerStats()
            statistics.sequenceID = 7
            statistics.layer = UInt32(layer)
            statistics.epoch = 3
            return statistics
        }
        return held
    }

    /// Sequence 7 assigned, to be prefilled in one-layer parts: the store, the bytes one layer holds,
    /// and each layer's part (every value 0.5, with that layer's statistics).
    static func awaitingParts() throws -> (
        store: WorkerState, layerBytes: Int, part: (Int) throws -> PrefillParts
    ) {
        var held = try prefilled()
        let statistics = held.statistics
        held.statistics = []
        var store = WorkerState()
        _ = try store.assign(7, held)
        let g = held.geometry
        let m = held.layout.promptLength
        func part(_ layer: Int) throws -> PrefillParts {
            var part = PrefillParts()
            let floats = [Float](repeating: 0.5, count: g.kvHeads * m * g.headDim)
            part.prefills[layer] = try LayerPrefill(
                geometry: g,
                promptLength: m,
                keys: floats,
                values: floats,
                queries: [],
                queryRows: 0
            )
            part.statistics = [statistics[layer]]
            return part
        }
        return (store, g.kvHeads * 2 * g.headDim * m * MemoryLayout<Float>.size, part)
    }

    static func moved(_ held: HeldSequence, to epoch: UInt64) -> HeldSequence {
        var moved = held
        moved.epoch = epoch
        moved.assignment.epoch = epoch
        return moved
    }

    @Test func aCopyMovedToANewEpochBeforeCompressionReportsItsStatisticsAgain() async throws {
        let held = try Self.prefilled()
        var store = WorkerState()
        #expect(try store.assign(7, held).isEmpty, "a new copy has nothing to report yet")
        #expect(try store.assign(7, held).isEmpty, "the same epoch again changes nothing")

        let again = try store.assign(7, Self.moved(held, to: 4))
        #expect(again.map(\.layer) == [0, 1])
        #expect(again.allSatisfy { $0.epoch == 4 }, "stamped with the new epoch")
        // After a coordinator restart the copy reports them at the epoch it is at.
        #expect(store.layerStatistics().map(\.epoch) == [4, 4])

        // An older assignment arriving late changes nothing.
        #expect(try store.assign(7, Self.moved(held, to: 2)).isEmpty)
        #expect(store.layerStatistics().map(\.epoch) == [4, 4])
    }

    /// A prefill sent in parts (one layer each) is prefilled, and reports its statistics, only once
    /// the last part arrives; a part sent again is acknowledged, and one that overlaps an earlier
    /// part without repeating it is refused.
    @Test func aPrefillInPartsCompletesWithItsLastLayer() async throws {
        let fixture = try Self.awaitingParts()
        var store = fixture.store
        let layerBytes = fixture.layerBytes
        let part = fixture.part

        #expect(try store.beginExpansion(7, layers: [0]) == nil)
        let first = try store.storePrefill(7, try part(0), syntheticDecode: nil, needle: nil, audited: false)
        #expect(first.bytes == layerBytes && first.statistics.isEmpty, "one layer held, nothing to report yet")
        #expect(store.layerStatistics().isEmpty)
        #expect(try store.beginExpansion(7, layers: [0]) == layerBytes, "a part sent again is acknowledged")
        #expect(throws: WireError.self) { _ = try store.beginExpansion(7, layers: [0, 1]) }

        #expect(try store.beginExpansion(7, layers: [1]) == nil)
        let last = try store.storePrefill(7, try part(1), syntheticDecode: nil, needle: nil, audited: false)
        #expect(last.bytes == 2 * layerBytes)
        #expect(last.statistics.map(\.layer) == [0, 1], "every layer's statistics, once the shard is complete")
        #expect(try store.beginExpansion(7, layers: [1]) == 2 * layerBytes)
        #expect(try store.prefillForCompression(7).ready?.held.prefills.keys.sorted() == [0, 1])
    }

    /// Parts with other layers expand at once (a client keeps two on their way); a part that
    /// overlaps one still expanding waits (UNAVAILABLE), and layers being expanded count as held.
    @Test func disjointPartsExpandAtOnce() throws {
        let fixture = try Self.awaitingParts()
        var store = fixture.store
        let layerBytes = fixture.layerBytes
        let part = fixture.part

        #expect(try store.beginExpansion(7, layers: [1]) == nil)
        #expect(try store.beginExpansion(7, layers: [0]) == nil, "another part's layers expand at once")
        #expect(store.heldShards().first?.kvBytes == UInt64(2 * layerBytes), "both counted while they expand")
        #expect {
            try store.beginExpansion(7, layers: [0])
        } throws: { ($0 as? WireError)?.code == .unavailable }

        let second = try store.storePrefill(7, try part(1), syntheticDecode: nil, needle: nil, audited: false)
        #expect(second.statistics.isEmpty, "layer 0 is still on its way")
        store.abandonExpansion(7, layers: [0])
        #expect(store.heldShards().first?.kvBytes == UInt64(layerBytes), "an abandoned part is not held")
        #expect(try store.beginExpansion(7, layers: [0]) == nil, "and may be sent again")
        let first = try store.storePrefill(7, try part(0), syntheticDecode: nil, needle: nil, audited: false)
        #expect(first.bytes == 2 * layerBytes && first.statistics.map(\.layer) == [0, 1])
    }

    @Test func aCompressedCopyHasNothingToReport() async throws {
        let held = try ShardTransferTests.shard(storage: .float32)
        var store = WorkerState()
        _ = try store.assign(7, held)
        #expect(try store.assign(7, Self.moved(held, to: 4)).isEmpty)
    }

    /// The coordinator drops a copy a failover left behind only up to its epoch: a newer copy made to
    /// the same worker since is kept.
    @Test func aCloseUpToAnEpochKeepsANewerCopy() async throws {
        let held = try ShardTransferTests.shard(storage: .float32)
        var store = WorkerState()
        _ = try store.assign(7, Self.moved(held, to: 4))
        #expect(store.close(7, through: 3) == 0)
        #expect(store.heldShards().map(\.assignment.epoch) == [4])
        #expect(store.close(7, through: 4) > 0)
        #expect(store.heldShards().isEmpty)
        #expect(store.closedSequences.isEmpty, "a copy left behind is not a closed sequence")

        _ = try store.assign(7, Self.moved(held, to: 5))
        #expect(store.closeSequence(7) > 0)
        let closed = store.closedSequences
        #expect(closed.map(\.sequenceID) == [7] && closed.map(\.epoch) == [5])
    }

    /// Admission charges the rows of the decode tokens a client declares; a step past them would make
    /// the workers hold more than the memory limit counts.
    @Test func aStepPastTheDeclaredDecodeTokensIsRefused() async throws {
        var held = try ShardTransferTests.shard(storage: .float32)
        held.assignment.decodeTokens = 1
        var store = WorkerState()
        _ = try store.assign(7, held)
        #expect {
            try store.beginDecode(7, step: 1, inputs: nil, threads: 1)
        } throws: { ($0 as? WireError)?.code == .resourceExhausted }
    }

    /// A replica given the step its primary attended appends the same rows and answers with the
    /// primary's result, without attending: a result it could not have computed comes back as it
    /// was sent, and the two copies still hold the same bytes.
    @Test func aReplicaAppendsItsPrimarysStepWithoutAttending() throws {
        let geometry = ShardTransferTests.geometry
        let d = geometry.headDim
        let inputs = try Dictionary(
            uniqueKeysWithValues: (0..<2).map { layer in
                let row = { (n: Int) in (0..<n).map { Float(layer + 1) * 0.01 * Float($0 % 7) } }
                return (
                    layer,
                    try DecodeStepInput(
                        geometry: geometry,
                        keys: row(geometry.kvHeads * d),
                        values: row(geometry.kvHeads * d),
                        queries: row(geometry.queryHeads * d)
                    )
                )
            }
        )
        func step(given primaryResult: Tessera_V1_DecodeResult?) throws -> (Tessera_V1_DecodeResult, UInt64) {
            let held = try ShardTransferTests.shard(storage: .float32)
            var store = WorkerState()
            _ = try store.assign(7, held)
            guard
                case .run(let job) = try store.beginDecode(
                    7,
                    step: held.nextStep,
                    inputs: inputs,
                    primaryResult: primaryResult,
                    threads: 1
                )
            else {
                Issue.record("the step was not run")
                return (Tessera_V1_DecodeResult(), 0)
            }
            let result = try job.run()
            store.finishDecode(job, result: result)
            return (result, store.sequenceStatuses(tenant: nil)[0].digest)
        }
        let (attended, primaryDigest) = try step(given: nil)
        #expect(attended.outputs.count == 2)
        var impossible = attended
        impossible.outputs[0].output.data = Data(repeating: 0x7F, count: attended.outputs[0].output.data.count)
        let (answered, replicaDigest) = try step(given: impossible)
        #expect(answered == impossible, "the replica answered with something else than its primary's result")
        #expect(replicaDigest == primaryDigest, "the replica's rows differ from its primary's")
        let (_, again) = try step(given: nil)
        #expect(again == primaryDigest, "the step is deterministic")
    }

    /// Only a primary forwarding a step sets `primary_result`, and only for that step.
    @Test func onlyAForwardedStepCarriesItsPrimarysResult() {
        var decode = Tessera_V1_Decode()
        decode.sequenceID = 7
        decode.shardID = 1
        decode.step = 4
        #expect(throws: Never.self) { try WorkerHandler.checkPrimaryResult(of: decode, forwardedBy: nil) }
        #expect {
            try WorkerHandler.checkPrimaryResult(of: decode, forwardedBy: "worker-1")
        } throws: { ($0 as? WireError)?.code == .badRequest }
        decode.primaryResult.sequenceID = 7
        decode.primaryResult.shardID = 1
        decode.primaryResult.step = 4
        #expect(throws: Never.self) { try WorkerHandler.checkPrimaryResult(of: decode, forwardedBy: "worker-1") }
        #expect {
            try WorkerHandler.checkPrimaryResult(of: decode, forwardedBy: nil)
        } throws: { ($0 as? WireError)?.code == .badRequest }
        decode.primaryResult.step = 3
        #expect {
            try WorkerHandler.checkPrimaryResult(of: decode, forwardedBy: "worker-1")
        } throws: { ($0 as? WireError)?.code == .badRequest }
    }

    /// While a copy has the cache, decode steps are refused and another copy waits for it; closing
    /// the sequence fails whatever still waits with UNKNOWN_SEQUENCE (whether it was parked by then
    /// or asked after, the outcome is the same, so the test needs no timing).
    @Test func aCopyHoldsStepsBackAndAClosingReleasesWhatWaits() async throws {
        let held = try ShardTransferTests.shard(storage: .float32)
        let store = SequenceStore()
        _ = try store.withLock { try $0.assign(7, held) }
        #expect(try store.withLock { try $0.beginTransfer(7, shardID: 1, epoch: 3) }.ready != nil)
        #expect {
            try store.withLock { try $0.beginDecode(7, step: held.nextStep, inputs: nil, threads: 1) }
        } throws: { ($0 as? WireError)?.code == .unavailable }
        let second = Task { try await store.waiting { try $0.beginTransfer(7, shardID: 1, epoch: 3) } }
        store.withLock { $0.endTransfer(7, adding: nil) }
        #expect(try await second.value.shardID == 1, "the second copy starts once the first ended")
        let third = Task { try await store.waiting { try $0.beginTransfer(7, shardID: 1, epoch: 3) } }
        #expect(store.withLock { $0.close(7) } > 0)
        await #expect {
            try await third.value
        } throws: { ($0 as? WireError)?.code == .unknownSequence }
    }

    /// A place in line taken before the event it waits for is not lost when the event comes before
    /// the caller parks: the wait returns at once. One taken after a closing fails at once.
    @Test func aTicketResumedBeforeItsWaitReturnsAtOnce() async throws {
        let waiters = Waiters()
        let early = waiters.ticket()
        waiters.resumeAll()
        try await early.wait()
        let late = waiters.ticket()
        waiters.failAll(WireError(.unknownSequence, "closed"))
        await #expect { try await late.wait() } throws: { ($0 as? WireError)?.code == .unknownSequence }
        await #expect { try await waiters.ticket().wait() } throws: { ($0 as? WireError)?.code == .unknownSequence }
    }
}

extension Waitable {
    /// The outcome, if the decision did not have to wait.
    var ready: Value? {
        guard case .ready(let value) = self else { return nil }
        return value
    }
}

/// Prefill work and audited steps yield the cores to decode steps: their threads run in Linux's idle
/// scheduling class.
struct ComputeThreadsTests {
    @Test func prefillWorkAndAuditedStepsRunBelowDecodeSteps() async throws {
        let threads = ComputeThreads()
        threads.start()
        defer { threads.shutdown() }
        #if os(Linux)
        let idle = PrefillPriority.idlePolicy
        let decode = try await threads.run(.decode) { sched_getscheduler(0) }
        #expect(try await threads.run(.prefill) { sched_getscheduler(0) } == idle)
        #expect(try await threads.run(.audit) { sched_getscheduler(0) } == idle)
        // Decode threads keep the process's own class, even after prefill work ran elsewhere.
        #expect(try await threads.run(.decode) { sched_getscheduler(0) } == decode)
        #expect(decode != idle)
        #endif
    }

    /// A prefill job or an audited step that splits a layer's heads across cores keeps every share in
    /// its class: the system's shared threads would run the others at the process's priority.
    @Test(arguments: [WorkerService.Work.prefill, .audit])
    func aJobSplitsItsWorkOnlyAcrossThreadsOfItsClass(_ kind: WorkerService.Work) async throws {
        let threads = ComputeThreads()
        threads.start()
        defer { threads.shutdown() }
        #if os(Linux)
        let team = threads.team(kind)
        let classes = try await threads.run(kind) {
            let seen = Mutex([Int32](repeating: -1, count: team.count))
            team.forEachWorker(limit: team.count) { worker, _ in
                let policy = sched_getscheduler(0)
                seen.withLock { $0[worker] = policy }
            }
            // Many short splits in a row: a helper that still held a split's closure once the
            // split returned would trap ("non-escaping closure has escaped").
            for _ in 0..<2000 { team.forEachWorker(limit: team.count) { _, _ in } }
            return seen.withLock { $0 }
        }
        #expect(classes == Array(repeating: PrefillPriority.idlePolicy, count: team.count))
        #endif
    }
}

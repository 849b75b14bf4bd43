import ClusterWire
import KVCacheCore
import SwiftProtobuf
import Testing

private func head(_ visual: Int, _ text: Int, mass: Double = 0.5) -> HeadModalityStatistics {
    HeadModalityStatistics(
        visualMass: mass,
        textMass: 1 - mass,
        visualDemand: visual,
        textDemand: text,
        jointDemand: visual + text - 1,
        visualCount: 100,
        textCount: 20
    )
}

@Suite("Statistics and budgets <-> proto")
struct BudgetConversionTests {
    static let statistics = LayerStatistics(
        layer: 5,
        promptLength: 140,
        density: 0.1 + 0.2,
        heads: [head(12, 3, mass: 0.7), head(100, 20, mass: 1.0 / 3)]
    )

    @Test("statistics round-trip exactly, with sequence id and epoch")
    func statisticsRoundTrip() throws {
        let message = try Self.statistics.proto(sequenceID: 77, epoch: 9)
        #expect(message.sequenceID == 77)
        #expect(message.epoch == 9)
        #expect(message.layer == 5)
        #expect(message.heads.map(\.jointDemand) == [14, 119])
        #expect(message.heads.map(\.visualDemand) == [12, 100])
        let bytes: [UInt8] = try message.serializedBytes()
        let decoded = try LayerStatistics(
            proto: try Tessera_V1_LayerStats(serializedBytes: bytes),
            geometry: .tiny
        )
        #expect(decoded == Self.statistics)
        #expect(decoded.density.bitPattern == Self.statistics.density.bitPattern)

        // Policies other than MadaKV send no heads.
        let plain = LayerStatistics(layer: 0, promptLength: 1, density: 1, heads: [])
        #expect(try LayerStatistics(proto: try plain.proto(sequenceID: 1, epoch: 1), geometry: .tiny) == plain)
    }

    @Test("statistics the core computes round-trip")
    func computedStatistics() throws {
        let layout = try PromptLayout(spans: [
            ModalitySpan(.text, start: 0, count: 3), ModalitySpan(.image(0), start: 3, count: 8),
            ModalitySpan(.text, start: 11, count: 5),
        ])
        let head = HeadModalityStatistics(
            visualMass: 0.6,
            textMass: 0.4,
            visualDemand: 5,
            textDemand: 2,
            jointDemand: 6,
            visualCount: 8,
            textCount: 4
        )
        let stats = LayerStatistics(layer: 2, promptLength: layout.promptLength, density: 1, heads: [head, head])
        #expect(try LayerStatistics(proto: try stats.proto(sequenceID: 3, epoch: 4)) == stats)
    }

    struct BadStatistics: Sendable, CustomTestStringConvertible {
        var description: String
        var change: @Sendable (inout Tessera_V1_LayerStats) -> Void
        var code: WireError.Code
        var message: String
        var testDescription: String { description }
    }

    @Test(
        "invalid statistics are rejected naming the field",
        arguments: [
            BadStatistics(
                description: "NaN density",
                change: { $0.density = .nan },
                code: .invalidValue,
                message: "stats.density must be in [0, 1], got nan"
            ),
            BadStatistics(
                description: "density above 1",
                change: { $0.density = 1.5 },
                code: .invalidValue,
                message: "stats.density must be in [0, 1], got 1.5"
            ),
            BadStatistics(
                description: "prompt length 0",
                change: { $0.promptLength = 0 },
                code: .invalidValue,
                message: "stats.promptLength must be in 1...\(UInt32.max), got 0"
            ),
            BadStatistics(
                description: "more positions than the prompt",
                change: { $0.promptLength = 119 },
                code: .invalidValue,
                message: "stats.heads[0]: visualCount + textCount must be at most promptLength 119, got 100 + 20"
            ),
            BadStatistics(
                description: "negative mass",
                change: { $0.heads[1].textMass = -0.5 },
                code: .invalidValue,
                message: "stats.heads[1].textMass must be finite and ≥ 0, got -0.5"
            ),
            BadStatistics(
                description: "infinite mass",
                change: { $0.heads[0].visualMass = .infinity },
                code: .invalidValue,
                message: "stats.heads[0].visualMass must be finite and ≥ 0, got inf"
            ),
            BadStatistics(
                description: "demand above count",
                change: { $0.heads[0].visualDemand = 101 },
                code: .invalidValue,
                message: "stats.heads[0].visualDemand must be in 0...visualCount = 0...100, got 101"
            ),
            BadStatistics(
                description: "joint demand above count",
                change: { $0.heads[1].jointDemand = 121 },
                code: .invalidValue,
                message: "stats.heads[1].jointDemand must be in 0...visualCount + textCount = 0...120, got 121"
            ),
            BadStatistics(
                description: "layer past the model",
                change: { $0.layer = 6 },
                code: .invalidValue,
                message: "stats.layer must be in 0..<6, got 6"
            ),
            BadStatistics(
                description: "one head too many",
                change: { $0.heads.append($0.heads[0]) },
                code: .invalidShape,
                message: "stats.heads must be empty or hold one entry per KV head (2), got 3"
            ),
        ]
    )
    func badStatistics(bad: BadStatistics) throws {
        var message = try Self.statistics.proto(sequenceID: 1, epoch: 1)
        bad.change(&message)
        let error = wireError { _ = try LayerStatistics(proto: message, geometry: .tiny) }
        #expect(error?.code == bad.code)
        #expect(error?.message == bad.message, "\(error?.message ?? "")")
    }

    @Test("encoding invalid statistics throws")
    func encodeBadStatistics() {
        var stats = Self.statistics
        stats.heads[0].textDemand = -1
        #expect(wireError { _ = try stats.proto(sequenceID: 1, epoch: 1) }?.code == .invalidValue)
        stats = Self.statistics
        stats.layer = -1
        let error = wireError { _ = try stats.proto(sequenceID: 1, epoch: 1) }
        #expect(error?.message == "stats.layer must be in 0...\(UInt32.max), got -1")
    }

    // MARK: Budgets

    static let budgets = [
        LayerBudget(
            layer: 2,
            heads: [
                HeadBudget(capacity: 35, split: ModalitySplit(visual: 20, text: 15)),
                HeadBudget(capacity: 32, split: ModalitySplit(visual: 0, text: 0)),
            ]
        ),
        LayerBudget(layer: 3, heads: [HeadBudget(capacity: 40), HeadBudget(capacity: 1)]),
    ]

    @Test("budgets round-trip exactly; nil split and a 0/0 split stay distinct")
    func budgetRoundTrip() throws {
        let message = try Self.budgets.proto(sequenceID: 12, epoch: 4)
        #expect(message.sequenceID == 12)
        #expect(message.epoch == 4)
        #expect(message.layers.map(\.layer) == [2, 3])
        #expect(message.layers[0].heads.map(\.hasSplit) == [true, true])
        #expect(message.layers[1].heads.map(\.hasSplit) == [false, false])
        let bytes: [UInt8] = try message.serializedBytes()
        let decoded = try [LayerBudget](proto: try Tessera_V1_AssignBudget(serializedBytes: bytes), geometry: .tiny)
        #expect(decoded == Self.budgets)
        #expect(decoded[0].heads[1].split == ModalitySplit(visual: 0, text: 0))
        #expect(decoded[1].heads[0].split == nil)

        #expect(try LayerBudget(proto: try Self.budgets[0].proto()) == Self.budgets[0])
        #expect(try [LayerBudget](proto: try [LayerBudget]().proto(sequenceID: 1, epoch: 1)) == [])
    }

    struct BadBudget: Sendable, CustomTestStringConvertible {
        var description: String
        var change: @Sendable (inout Tessera_V1_AssignBudget) -> Void
        var code: WireError.Code
        var message: String
        var testDescription: String { description }
    }

    @Test(
        "invalid budgets are rejected naming the field",
        arguments: [
            BadBudget(
                description: "capacity 0",
                change: { $0.layers[1].heads[0].capacity = 0 },
                code: .invalidValue,
                message: "assign_budget.layers[1].heads[0].capacity must be in 1...\(UInt32.max), got 0"
            ),
            BadBudget(
                description: "split above capacity",
                change: { $0.layers[0].heads[0].split.visual = 21 },
                code: .invalidValue,
                message: "assign_budget.layers[0].heads[0].split must have visual ≥ 0, text ≥ 0 and "
                    + "visual + text ≤ capacity 35, got visual 21, text 15"
            ),
            BadBudget(
                description: "repeated layer",
                change: { $0.layers[1].layer = 2 },
                code: .badRequest,
                message: "assign_budget.layers[1].layer 2 repeats layers[0]; each layer at most once"
            ),
            BadBudget(
                description: "wrong head count",
                change: { $0.layers[0].heads.removeLast() },
                code: .invalidShape,
                message: "assign_budget.layers[0].heads must hold one entry per KV head (2), got 1"
            ),
            BadBudget(
                description: "layer past the model",
                change: { $0.layers[1].layer = 99 },
                code: .invalidValue,
                message: "assign_budget.layers[1].layer must be in 0..<6, got 99"
            ),
        ]
    )
    func badBudget(bad: BadBudget) throws {
        var message = try Self.budgets.proto(sequenceID: 1, epoch: 1)
        bad.change(&message)
        let error = wireError { _ = try [LayerBudget](proto: message, geometry: .tiny) }
        #expect(error?.code == bad.code)
        #expect(error?.message == bad.message, "\(error?.message ?? "")")
    }

    @Test("without a geometry a layer still needs a head; encoding checks as decoding does")
    func budgetChecksWithoutGeometry() {
        var empty = Tessera_V1_LayerBudget()
        empty.layer = 1
        let error = wireError { _ = try LayerBudget(proto: empty) }
        #expect(error?.code == .invalidShape)
        #expect(error?.message == "layer.heads must hold at least one entry, got none")

        var repeated = Self.budgets
        repeated[1].layer = 2
        #expect(wireError { _ = try repeated.proto(sequenceID: 1, epoch: 1) }?.code == .badRequest)
        var negative = Self.budgets
        negative[0].heads[0].split = ModalitySplit(visual: -1, text: 3)
        #expect(wireError { _ = try negative.proto(sequenceID: 1, epoch: 1) }?.code == .invalidValue)
        var zero = Self.budgets
        zero[1].heads[1].capacity = 0
        #expect(wireError { _ = try zero.proto(sequenceID: 1, epoch: 1) }?.code == .invalidValue)
    }
}

import ClusterState

/// SplitMix64: a tiny, seedable generator so that randomized tests replay exactly from their seed.
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64

    init(seed: UInt64) {
        self.state = seed
    }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Instants in milliseconds, for readable tests.
func at(ms: UInt64) -> ClusterInstant {
    ClusterInstant(nanoseconds: ms * 1_000_000)
}

func address(_ port: Int) -> MemberAddress {
    MemberAddress(host: "127.0.0.1", port: port)
}

func workers(_ count: Int) -> [NodeID] {
    (0..<count).map { NodeID("w\(String(repeating: "0", count: $0 < 10 ? 1 : 0))\($0)") }
}

extension JoinOutcome {
    var member: Member? {
        if case .accepted(let member, _) = self { return member }
        return nil
    }

    var refusal: JoinRefusal? {
        if case .refused(let refusal) = self { return refusal }
        return nil
    }
}

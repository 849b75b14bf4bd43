/// The network between hosts when `tessera cluster up --hosts N` runs each process in a network
/// namespace of its own (YAML section `network`). Values are written as `tc netem` writes them:
/// `{subnet: 10.213.0.0/24, delay: 2ms, jitter: 1ms, loss: 0.1%, rate: 10gbit}`.
///
/// Ignored without `--hosts`: on loopback there is no link to shape.
public struct NetworkSettings: Sendable, Codable, Equatable {
    /// The private IPv4 range the hosts get addresses from; `nil` picks the first free /24 of
    /// 10.213.0.0/16 … 10.250.255.0/24.
    public var subnet: String?
    /// One-way latency added to every packet a host sends (`us`, `ms` or `s`).
    public var delay: String?
    /// Each packet's delay varies uniformly by up to this much either way.
    public var jitter: String?
    /// Share of packets dropped, as a percentage (`0.1%`).
    public var loss: String?
    /// Each host's link rate (`bit`, `kbit`, `mbit`, `gbit`).
    public var rate: String?
    /// Seeds each packet's jitter and loss where Tessera draws them (kernels without netem); `nil`
    /// draws a seed, which the launcher logs.
    public var seed: UInt64?

    public init(
        subnet: String? = nil,
        delay: String? = nil,
        jitter: String? = nil,
        loss: String? = nil,
        rate: String? = nil,
        seed: UInt64? = nil
    ) {
        self.subnet = subnet
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.rate = rate
        self.seed = seed
    }

    public static var defaults: Self { Self() }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case subnet, delay, jitter, loss, rate, seed
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self, section: "network")
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.subnet = try container.decodeIfPresent(String.self, forKey: .subnet)
        self.delay = try container.decodeIfPresent(String.self, forKey: .delay)
        self.jitter = try container.decodeIfPresent(String.self, forKey: .jitter)
        self.loss = try container.decodeIfPresent(String.self, forKey: .loss)
        self.rate = try container.decodeIfPresent(String.self, forKey: .rate)
        self.seed = try container.decodeIfPresent(UInt64.self, forKey: .seed)
    }

    /// Settings written as on the command line, `delay=2ms,jitter=1ms,loss=0.1%,rate=10gbit,seed=7`
    /// (the same keys as the YAML section); each key given replaces this value's.
    ///
    /// - Throws: ``ClusterAdminError/Code/unknownKey`` or ``ClusterAdminError/Code/invalidValue``.
    public func merging(_ text: String) throws(ClusterAdminError) -> Self {
        var merged = self
        for pair in text.split(separator: ",", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1).map { String($0) }
            let allowed = CodingKeys.allCases.map(\.stringValue).joined(separator: ", ")
            guard parts.count == 2, let key = CodingKeys(rawValue: parts[0]) else {
                throw ClusterAdminError(
                    code: .unknownKey,
                    message: "network: \"\(pair)\" is not KEY=VALUE with a key of \(allowed)",
                    fieldPath: "network"
                )
            }
            switch key {
            case .subnet: merged.subnet = parts[1]
            case .delay: merged.delay = parts[1]
            case .jitter: merged.jitter = parts[1]
            case .loss: merged.loss = parts[1]
            case .rate: merged.rate = parts[1]
            case .seed:
                guard let seed = UInt64(parts[1]) else {
                    throw invalid("network.seed", "must be an integer in 0...\(UInt64.max), got \"\(parts[1])\"")
                }
                merged.seed = seed
            }
        }
        try merged.validate()
        return merged
    }

    /// The link every host gets, parsed and checked.
    ///
    /// - Throws: ``ClusterAdminError/Code/invalidValue`` naming the field, what it got and what is allowed.
    public func link() throws(ClusterAdminError) -> LinkProfile {
        let delay = try Self.parse(self.delay, "network.delay", LinkProfile.delayRange, units: Self.timeUnits) ?? 0
        let jitter = try Self.parse(self.jitter, "network.jitter", LinkProfile.delayRange, units: Self.timeUnits) ?? 0
        guard jitter <= delay else {
            throw invalid(
                "network.jitter",
                "must be at most network.delay (\(self.delay ?? "0")), got \(self.jitter ?? "")"
            )
        }
        let loss = try Self.parse(self.loss, "network.loss", 0...100, units: ["%": 1]) ?? 0
        let rate = try Self.parse(self.rate, "network.rate", LinkProfile.rateRange, units: Self.rateUnits)
        return LinkProfile(
            delayMicroseconds: Int(delay.rounded()),
            jitterMicroseconds: Int(jitter.rounded()),
            lossPercent: loss,
            rateBitsPerSecond: rate.map { Int($0.rounded()) }
        )
    }

    /// The range the hosts' addresses come from, or `nil` to pick a free one.
    public func subnetRange() throws(ClusterAdminError) -> IPv4Subnet? {
        guard let subnet else { return nil }
        guard let parsed = IPv4Subnet(subnet) else {
            throw invalid("network.subnet", "must be an IPv4 range such as 10.213.0.0/24, got \"\(subnet)\"")
        }
        guard IPv4Subnet.prefixLengths.contains(parsed.prefixLength) else {
            throw invalid(
                "network.subnet",
                "must have a prefix length in \(IPv4Subnet.prefixLengths) (room for 64 hosts), got /\(parsed.prefixLength)"
            )
        }
        guard parsed.isPrivate else {
            throw invalid("network.subnet", "must lie in 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16, got \(subnet)")
        }
        return parsed
    }

    /// Checks every field.
    public func validate() throws(ClusterAdminError) {
        _ = try link()
        _ = try subnetRange()
    }

    private static let timeUnits: [String: Double] = ["us": 1, "ms": 1_000, "s": 1_000_000]
    private static let rateUnits: [String: Double] = [
        "bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000,
    ]

    /// `text` as a number times its unit's factor, in `range`; nil when absent.
    private static func parse(
        _ text: String?,
        _ path: String,
        _ range: ClosedRange<Double>,
        units: [String: Double]
    ) throws(ClusterAdminError) -> Double? {
        guard let text else { return nil }
        let digits = text.prefix { $0.isNumber || $0 == "." }
        let unit = text.dropFirst(digits.count).lowercased()
        let allowed = units.keys.sorted { units[$0]! < units[$1]! }.joined(separator: ", ")
        guard let number = Double(digits), let factor = units[unit] else {
            throw invalid(path, "must be a number followed by one of \(allowed), got \"\(text)\"")
        }
        let value = number * factor
        guard range.contains(value) else {
            throw invalid(
                path,
                "must be in \(range.lowerBound)...\(range.upperBound) (units of \(units.first { $0.value == 1 }!.key)), got \"\(text)\""
            )
        }
        return value
    }
}

/// What a host's link does to every packet it sends, as `tc netem` applies it.
public struct LinkProfile: Sendable, Equatable, CustomStringConvertible {
    public var delayMicroseconds: Int
    public var jitterMicroseconds: Int
    public var lossPercent: Double
    /// `nil`: as fast as the kernel moves it.
    public var rateBitsPerSecond: Int?

    public init(
        delayMicroseconds: Int = 0,
        jitterMicroseconds: Int = 0,
        lossPercent: Double = 0,
        rateBitsPerSecond: Int? = nil
    ) {
        self.delayMicroseconds = delayMicroseconds
        self.jitterMicroseconds = jitterMicroseconds
        self.lossPercent = lossPercent
        self.rateBitsPerSecond = rateBitsPerSecond
    }

    /// Delays and jitter allowed, in microseconds (up to 10 s).
    public static let delayRange: ClosedRange<Double> = 0...10_000_000
    /// Rates allowed, in bits per second (8 kbit/s to 400 gbit/s).
    public static let rateRange: ClosedRange<Double> = 8_000...400_000_000_000

    /// `delay 2ms ± 1ms, loss 0.1%, rate 10gbit/s`, or `unshaped`.
    public var description: String {
        var parts: [String] = []
        if delayMicroseconds > 0 || jitterMicroseconds > 0 {
            parts.append(
                "delay \(Self.milliseconds(delayMicroseconds))"
                    + (jitterMicroseconds > 0 ? " ± \(Self.milliseconds(jitterMicroseconds))" : "")
            )
        }
        if lossPercent > 0 { parts.append("loss \(lossPercent)%") }
        if let rateBitsPerSecond { parts.append("rate \(Double(rateBitsPerSecond) / 1e9) Gbit/s") }
        return parts.isEmpty ? "unshaped" : parts.joined(separator: ", ")
    }

    private static func milliseconds(_ microseconds: Int) -> String {
        microseconds % 1_000 == 0 ? "\(microseconds / 1_000)ms" : "\(Double(microseconds) / 1_000)ms"
    }

    /// A link that changes nothing.
    public var isTransparent: Bool { self == LinkProfile() }

    /// The profile as `tc qdisc … netem` arguments (`delay 2000us 1000us loss 0.1% rate 10000000000bit`).
    public var netemArguments: [String] {
        var arguments: [String] = []
        if delayMicroseconds > 0 {
            arguments += ["delay", "\(delayMicroseconds)us"]
            if jitterMicroseconds > 0 { arguments.append("\(jitterMicroseconds)us") }
        }
        if lossPercent > 0 { arguments += ["loss", "\(lossPercent)%"] }
        if let rateBitsPerSecond { arguments += ["rate", "\(rateBitsPerSecond)bit"] }
        return arguments
    }
}

/// An IPv4 range such as `10.213.0.0/24`.
public struct IPv4Subnet: Sendable, Hashable, CustomStringConvertible {
    /// The first address, host bits zero.
    public var base: UInt32
    public var prefixLength: Int

    /// Prefix lengths a cluster's range may have: /8 … /25 leaves room for a bridge and 64 hosts.
    public static let prefixLengths = 8...25

    public init?(_ text: String) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let length = Int(parts[1]), (0...32).contains(length),
            let address = Self.address(parts[0])
        else { return nil }
        self.init(base: address, prefixLength: length)
    }

    public init(base: UInt32, prefixLength: Int) {
        self.prefixLength = prefixLength
        self.base = base & Self.mask(prefixLength)
    }

    /// `a.b.c.d` as a number, or nil.
    public static func address(_ text: Substring) -> UInt32? {
        let octets = text.split(separator: ".", omittingEmptySubsequences: false).compactMap { UInt8($0) }
        guard octets.count == 4 else { return nil }
        return octets.reduce(0) { $0 << 8 | UInt32($1) }
    }

    /// A number as `a.b.c.d`.
    public static func format(_ address: UInt32) -> String {
        (0..<4).map { "\(address >> (24 - 8 * $0) & 0xFF)" }.joined(separator: ".")
    }

    static func mask(_ length: Int) -> UInt32 { length == 0 ? 0 : ~UInt32(0) << (32 - length) }

    /// The `index`-th address of the range (0 is the range's own address).
    public func address(_ index: Int) -> String { Self.format(base + UInt32(index)) }

    /// Addresses the range holds, its own and its broadcast address included.
    public var size: Int { 1 << (32 - prefixLength) }

    public func overlaps(_ other: IPv4Subnet) -> Bool {
        let shorter = min(prefixLength, other.prefixLength)
        return base & Self.mask(shorter) == other.base & Self.mask(shorter)
    }

    /// Inside one of RFC 1918's private ranges.
    public var isPrivate: Bool {
        ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"].contains { range in
            let range = IPv4Subnet(range)!
            return prefixLength >= range.prefixLength && range.overlaps(self)
        }
    }

    public var description: String { "\(Self.format(base))/\(prefixLength)" }
}

private func invalid(_ path: String, _ requirement: String) -> ClusterAdminError {
    ClusterAdminError(code: .invalidValue, message: "\(path) \(requirement)", fieldPath: path)
}

import ClusterWire
import KVCacheCore
import SwiftProtobuf
import Testing

/// A policy with every setting changed from its default (where the type allows), for round trips.
struct PolicySample: Sendable, CustomTestStringConvertible {
    var policy: CompressionPolicy
    var keys: [String]
    var testDescription: String { "\(self.policy.name) \(self.keys)" }

    static let all: [PolicySample] = {
        var streaming = StreamingLLMSettings()
        streaming.sinks = 7

        var h2o = H2OSettings()
        h2o.recentShare = 0.1 + 0.2  // 0.30000000000000004: needs every digit
        h2o.normalizeByQueryCount = true

        var snap = SnapKVSettings()
        snap.window = 48
        snap.kernel = 7
        snap.pooling = .max

        var pyramid = PyramidKVSettings()
        pyramid.snap.window = 16
        pyramid.snap.kernel = 3
        pyramid.snap.pooling = .none
        pyramid.beta = 1 + 1.0 / 3

        var vl = VLCacheSettings()
        vl.threshold = Float(1) / 3
        vl.minFraction = 0.05
        vl.maxFraction = 0.8
        vl.recentShare = 1e-7
        vl.observation = .lastRows(50)
        vl.apportionment = .largestRemainder

        var mada = MadaKVSettings()
        mada.proxyWindow = 24
        mada.theta = 0.95
        mada.minRatio = 0.000_123
        mada.components = .hccOnly
        mada.compensation = .keepDemand

        var mpa = MadaKVSettings()
        mpa.components = .mpaOnly

        var look = LookMSettings()
        look.recentShare = 0.25
        look.textPrior = .keepAllText
        look.merge = .weighted
        look.sinks = 2
        look.filterBelowMeanSimilarity = false

        var composite = CompositeSettings()
        composite.layerBudgets = false
        composite.merge = .pivotal
        composite.observation = .postVisionAtMost(32)

        return [
            PolicySample(policy: .full, keys: []),
            PolicySample(policy: .streamingLLM(streaming), keys: ["sinks"]),
            PolicySample(policy: .h2o(h2o), keys: ["recentShare", "normalizeByQueryCount"]),
            PolicySample(policy: .snapKV(snap), keys: ["window", "kernel", "pooling"]),
            PolicySample(policy: .pyramidKV(pyramid), keys: ["window", "kernel", "pooling", "beta"]),
            PolicySample(
                policy: .vlCache(vl),
                keys: ["threshold", "minFraction", "maxFraction", "recentShare", "observation", "apportionment"]
            ),
            PolicySample(
                policy: .madaKV(mada),
                keys: ["proxyWindow", "theta", "minRatio", "components", "compensation"]
            ),
            PolicySample(
                policy: .madaKV(mpa),
                keys: ["proxyWindow", "theta", "minRatio", "components", "compensation"]
            ),
            PolicySample(
                policy: .lookM(look),
                keys: ["recentShare", "textPrior", "merge", "sinks", "filterBelowMeanSimilarity"]
            ),
            PolicySample(policy: .composite(composite), keys: ["layerBudgets", "headSplit", "merge", "observation"]),
        ]
    }()
}

private func setting(_ key: String, _ value: String) -> Tessera_V1_PolicySetting {
    var entry = Tessera_V1_PolicySetting()
    entry.key = key
    entry.value = value
    return entry
}

private func policyMessage(
    _ name: String,
    retention: Double = 0.25,
    _ settings: [(String, String)] = []
)
    -> Tessera_V1_Policy
{
    var message = Tessera_V1_Policy()
    message.name = name
    message.retention = retention
    message.settings = settings.map { setting($0.0, $0.1) }
    return message
}

@Suite("Policy coding")
struct PolicyCodingTests {
    @Test(
        "every policy round-trips exactly, through bytes, with every setting spelled out",
        arguments: PolicySample.all
    )
    func roundTrip(sample: PolicySample) throws {
        let retention = 0.1 + 0.7  // 0.7999999999999999
        let message = try sample.policy.proto(retention: retention)
        #expect(message.name == sample.policy.name)
        #expect(message.settings.map(\.key) == sample.keys)
        #expect(CompressionPolicy.wireSettingKeys(of: sample.policy.name) == sample.keys)

        let bytes: [UInt8] = try message.serializedBytes()
        let decoded = try CompressionPolicy.decode(proto: try Tessera_V1_Policy(serializedBytes: bytes))
        #expect(decoded.policy == sample.policy)
        #expect(decoded.retention.bitPattern == retention.bitPattern)
        // Deterministic: encoding the decoded policy gives the same bytes.
        #expect(try decoded.policy.proto(retention: decoded.retention).serializedBytes() == bytes)
    }

    @Test("the names are CompressionPolicy.allNames and defaults round-trip")
    func allNames() throws {
        for name in CompressionPolicy.allNames {
            let policy = try CompressionPolicy.named(name)
            let decoded = try CompressionPolicy.decode(proto: try policy.proto(retention: 1))
            #expect(decoded.policy == policy)
            #expect(decoded.retention == 1)
        }
    }

    @Test("values are spelled as documented")
    func spelling() throws {
        let vl = try #require(PolicySample.all.first { $0.policy.name == "vl-cache" })
        let values = Dictionary(uniqueKeysWithValues: vl.policy.wireSettings.map { ($0.key, $0.value) })
        #expect(values["observation"] == "lastRows:50")
        #expect(values["apportionment"] == "largestRemainder")
        #expect(values["threshold"] == (Float(1) / 3).description)
        #expect(values["recentShare"] == "1e-07")

        let defaults = Dictionary(
            uniqueKeysWithValues: CompressionPolicy.vlCache(.init()).wireSettings.map { ($0.key, $0.value) }
        )
        #expect(defaults["observation"] == "postVision")
        #expect(defaults["threshold"] == "0.01")

        let h2o = CompressionPolicy.h2o(.init()).wireSettings
        #expect(h2o.map(\.value) == ["0.5", "false"])
    }

    @Test("decoding starts from the defaults and applies the keys given")
    func partialSettings() throws {
        let decoded = try CompressionPolicy.decode(
            proto: policyMessage("snapkv", [("kernel", "9"), ("pooling", "none")])
        )
        var expected = SnapKVSettings()
        expected.kernel = 9
        expected.pooling = .none
        #expect(decoded.policy == .snapKV(expected))

        let observation = try CompressionPolicy.decode(
            proto: policyMessage("vl-cache", [("observation", "postVision"), ("threshold", "0.125")])
        )
        var vl = VLCacheSettings()
        vl.threshold = 0.125
        #expect(observation.policy == .vlCache(vl))
    }

    @Test(
        "an unknown policy name is .badRequest listing the allowed names",
        arguments: ["uniform", "", "SnapKV", "vlcache"]
    )
    func unknownPolicy(name: String) {
        let error = wireError { _ = try CompressionPolicy.decode(proto: policyMessage(name)) }
        #expect(error?.code == .badRequest)
        #expect(error?.message.contains("policy.name '\(name)' is unknown") == true, "\(error?.message ?? "")")
        #expect(error?.message.contains(CompressionPolicy.allNames.joined(separator: ", ")) == true)
    }

    @Test("an unknown setting key is .badRequest listing the policy's keys")
    func unknownKey() {
        let error = wireError {
            _ = try CompressionPolicy.decode(proto: policyMessage("snapkv", [("window", "8"), ("merge", "pivotal")]))
        }
        #expect(error?.code == .badRequest)
        #expect(error?.message.contains("policy.settings[1].key 'merge' is unknown") == true, "\(error?.message ?? "")")
        #expect(error?.message.contains("allowed keys for 'snapkv': window, kernel, pooling") == true)

        let full = wireError { _ = try CompressionPolicy.decode(proto: policyMessage("full", [("window", "8")])) }
        #expect(full?.code == .badRequest)
        #expect(full?.message.contains("policy 'full' takes no settings") == true, "\(full?.message ?? "")")

        let repeated = wireError {
            _ = try CompressionPolicy.decode(proto: policyMessage("snapkv", [("window", "8"), ("window", "9")]))
        }
        #expect(repeated?.code == .badRequest)
        #expect(repeated?.message.contains("appears more than once") == true)
    }

    struct BadValue: Sendable, CustomTestStringConvertible {
        var policy: String
        var key: String
        var value: String
        var allowed: String
        var testDescription: String { "\(policy) \(key)=\(value)" }
    }

    @Test(
        "an unparsable value is .invalidValue naming the key, the value and what is allowed",
        arguments: [
            BadValue(policy: "snapkv", key: "window", value: "thirty", allowed: "an integer"),
            BadValue(policy: "snapkv", key: "window", value: "3.5", allowed: "an integer"),
            BadValue(policy: "snapkv", key: "pooling", value: "median", allowed: "one of average, max, none"),
            BadValue(policy: "pyramidkv", key: "beta", value: "nan", allowed: "a finite number"),
            BadValue(policy: "pyramidkv", key: "beta", value: "inf", allowed: "a finite number"),
            BadValue(policy: "h2o", key: "normalizeByQueryCount", value: "yes", allowed: "true or false"),
            BadValue(policy: "h2o", key: "recentShare", value: "", allowed: "a finite number"),
            BadValue(policy: "vl-cache", key: "threshold", value: "1e99", allowed: "a finite number"),
            BadValue(
                policy: "vl-cache",
                key: "observation",
                value: "lastRows:many",
                allowed: "postVision, postVision:<n> or lastRows:<n> with an integer n"
            ),
            BadValue(
                policy: "vl-cache",
                key: "apportionment",
                value: "exact",
                allowed: "one of clipped, largestRemainder"
            ),
            BadValue(policy: "madakv", key: "components", value: "all", allowed: "one of both, mpaOnly, hccOnly"),
            BadValue(
                policy: "madakv",
                key: "compensation",
                value: "none",
                allowed: "one of proportional, keepDemand"
            ),
            BadValue(
                policy: "look-m",
                key: "textPrior",
                value: "strong",
                allowed: "one of addMax, keepAllText, none"
            ),
            BadValue(
                policy: "look-m",
                key: "merge",
                value: "mean",
                allowed: "one of averaged, pivotal, weighted, values, none"
            ),
            BadValue(policy: "streaming-llm", key: "sinks", value: "four", allowed: "an integer"),
        ]
    )
    func badValue(_ bad: BadValue) {
        let error = wireError {
            _ = try CompressionPolicy.decode(proto: policyMessage(bad.policy, [(bad.key, bad.value)]))
        }
        #expect(error?.code == .invalidValue)
        #expect(
            error?.message
                == "policy.settings[0] '\(bad.key)' of policy '\(bad.policy)' must be \(bad.allowed), "
                + "got '\(bad.value)'",
            "\(error?.message ?? "")"
        )
    }

    @Test(
        "a value out of range is .invalidValue from validate()",
        arguments: [
            ("snapkv", "kernel", "4"), ("snapkv", "window", "0"), ("pyramidkv", "beta", "0.5"),
            ("vl-cache", "threshold", "1"), ("vl-cache", "observation", "lastRows:0"),
            ("composite", "observation", "lastRows:0"), ("composite", "observation", "postVision:0"),
            ("vl-cache", "maxFraction", "0.005"), ("madakv", "theta", "0"), ("look-m", "sinks", "-1"),
            ("h2o", "recentShare", "1.5"), ("streaming-llm", "sinks", "-3"),
        ]
    )
    func outOfRange(policy: String, key: String, value: String) {
        let error = wireError { _ = try CompressionPolicy.decode(proto: policyMessage(policy, [(key, value)])) }
        #expect(error?.code == .invalidValue)
        #expect(error?.message.hasPrefix("policy.settings: \(policy): ") == true, "\(error?.message ?? "")")
        #expect(error?.cause is KVCacheError)
    }

    @Test("encoding an invalid policy throws")
    func encodeInvalid() {
        var snap = SnapKVSettings()
        snap.kernel = 2
        let error = wireError { _ = try CompressionPolicy.snapKV(snap).proto(retention: 0.5) }
        #expect(error?.code == .invalidValue)
        #expect(error?.message.contains("kernel must be odd") == true)
    }

    @Test(
        "retention must be finite and in (0, 1], in both directions",
        arguments: [0, 1.5, Double.nan, -0.25, .infinity, -.infinity, Double.leastNonzeroMagnitude * -1, 1.000_000_1]
    )
    func badRetention(retention: Double) {
        let decoding = wireError { _ = try CompressionPolicy.decode(proto: policyMessage("h2o", retention: retention)) }
        #expect(decoding?.code == .invalidValue)
        #expect(
            decoding?.message == "policy.retention must be a finite fraction in (0, 1] (the share of K/V rows kept), "
                + "got \(retention)",
            "\(decoding?.message ?? "")"
        )
        let encoding = wireError { _ = try CompressionPolicy.full.proto(retention: retention) }
        #expect(encoding?.code == .invalidValue)
    }

    @Test("retention edge values that are allowed", arguments: [1, Double.leastNonzeroMagnitude, 0.5])
    func goodRetention(retention: Double) throws {
        let decoded = try CompressionPolicy.decode(proto: try CompressionPolicy.full.proto(retention: retention))
        #expect(decoded.retention == retention)
    }
}

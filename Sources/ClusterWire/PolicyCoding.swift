package import KVCacheCore

// `CompressionPolicy` plus retention <-> `tessera.v1.Policy{name, retention, settings}`.
//
// The name is one of `CompressionPolicy.allNames`. Every setting of the policy's settings struct
// travels as a key/value string pair, in a fixed order, so the encoding is deterministic and
// complete (a receiver whose defaults differ still gets the sender's policy):
//
// | policy          | keys                                                                     |
// |-----------------|--------------------------------------------------------------------------|
// | `full`          | (none)                                                                   |
// | `streaming-llm` | sinks                                                                    |
// | `h2o`           | recentShare, normalizeByQueryCount                                       |
// | `snapkv`        | window, kernel, pooling                                                  |
// | `adakv`         | window, kernel, pooling, safeguard                                       |
// | `pyramidkv`     | window, kernel, pooling, beta                                            |
// | `vl-cache`      | threshold, minFraction, maxFraction, recentShare, observation, apportionment |
// | `madakv`        | proxyWindow, theta, minRatio, components, compensation                   |
// | `look-m`        | recentShare, textPrior, merge, sinks, filterBelowMeanSimilarity          |
// | `tgv`           | sinks, recent                                                            |
// | `composite`     | layerBudgets, headSplit, merge, observation                              |
//
// Values: integers in decimal; numbers as Swift's `description` of the Double (Float for
// `threshold`), which parses back bit-identically; booleans `true`/`false`; enumerations by their
// case name (`average`, `largestRemainder`, …); VL-Cache's and the composite's observation
// `postVision`, `postVision:<n>` (at most the last n of those rows) or `lastRows:<n>`. Decoding starts
// from the policy's defaults and applies the keys given, so a sender may omit keys; then `validate()`
// checks the ranges.

/// How one setting of a settings struct `S` is written and read.
private struct SettingCoding<S> {
    /// The key on the wire, e.g. "window".
    var key: String
    /// What the value may be, for error messages: "an integer", "one of average, max, none".
    var allowed: String
    /// The setting's value as text.
    var encode: (S) -> String
    /// Applies a value; `false` when `text` does not parse.
    var decode: (inout S, String) -> Bool

    /// A setting whose value is written with `encode` and read with `parse` (`nil`: unparsable).
    static func value<Value>(
        _ key: String,
        _ path: WritableKeyPath<S, Value>,
        allowed: String,
        encode: @escaping (Value) -> String,
        parse: @escaping (String) -> Value?
    ) -> Self {
        Self(
            key: key,
            allowed: allowed,
            encode: { settings in encode(settings[keyPath: path]) },
            decode: { settings, text in
                guard let value = parse(text) else { return false }
                settings[keyPath: path] = value
                return true
            }
        )
    }

    /// Which rows observe the prompt: `postVision`, `postVision:<n>` or `lastRows:<n>`.
    static func observation(_ path: WritableKeyPath<S, VLCacheSettings.Observation>) -> Self {
        value(
            "observation",
            path,
            allowed: "postVision, postVision:<n> or lastRows:<n> with an integer n",
            encode: { observation in
                switch observation {
                case .postVision: "postVision"
                case .postVisionAtMost(let n): "postVision:\(n)"
                case .lastRows(let n): "lastRows:\(n)"
                }
            },
            parse: { text in
                if text == "postVision" { return .postVision }
                let parts = text.split(separator: ":", omittingEmptySubsequences: false)
                guard parts.count == 2, let n = Int(parts[1]) else { return nil }
                switch parts[0] {
                case "postVision": return .postVisionAtMost(n)
                case "lastRows": return .lastRows(n)
                default: return nil
                }
            }
        )
    }

    static func int(_ key: String, _ path: WritableKeyPath<S, Int>) -> Self {
        .value(key, path, allowed: "an integer", encode: \.description, parse: { Int($0) })
    }

    /// `description` round-trips: it prints the shortest text that parses back to the same bits.
    static func double(_ key: String, _ path: WritableKeyPath<S, Double>) -> Self {
        .value(key, path, allowed: "a finite number", encode: \.description) { text in
            Double(text).flatMap { $0.isFinite ? $0 : nil }
        }
    }

    static func float(_ key: String, _ path: WritableKeyPath<S, Float>) -> Self {
        .value(key, path, allowed: "a finite number", encode: \.description) { text in
            Float(text).flatMap { $0.isFinite ? $0 : nil }
        }
    }

    static func bool(_ key: String, _ path: WritableKeyPath<S, Bool>) -> Self {
        .value(key, path, allowed: "true or false", encode: \.description) { text in
            switch text {
            case "true": true
            case "false": false
            default: nil
            }
        }
    }

    /// A string-backed enumeration; `cases` lists every case (the core's enums are not
    /// `CaseIterable`, and conforming them here would be a foreign conformance).
    static func cases<Value: RawRepresentable<String>>(
        _ key: String,
        _ path: WritableKeyPath<S, Value>,
        _ cases: [Value]
    ) -> Self {
        .value(
            key,
            path,
            allowed: "one of " + cases.map(\.rawValue).joined(separator: ", "),
            encode: \.rawValue,
            parse: { Value(rawValue: $0) }
        )
    }
}

/// The codings of every policy's settings, in wire order.
private enum PolicySettingCodings {
    static var streamingLLM: [SettingCoding<StreamingLLMSettings>] {
        [.int("sinks", \.sinks)]
    }

    static var h2o: [SettingCoding<H2OSettings>] {
        [.double("recentShare", \.recentShare), .bool("normalizeByQueryCount", \.normalizeByQueryCount)]
    }

    static var snapKV: [SettingCoding<SnapKVSettings>] {
        [
            .int("window", \.window),
            .int("kernel", \.kernel),
            .cases("pooling", \.pooling, [Pooling.average, .max, .none]),
        ]
    }

    static var adaKV: [SettingCoding<AdaKVSettings>] {
        [
            .int("window", \.snap.window),
            .int("kernel", \.snap.kernel),
            .cases("pooling", \.snap.pooling, [Pooling.average, .max, .none]),
            .double("safeguard", \.safeguard),
        ]
    }

    static var pyramidKV: [SettingCoding<PyramidKVSettings>] {
        [
            .int("window", \.snap.window),
            .int("kernel", \.snap.kernel),
            .cases("pooling", \.snap.pooling, [Pooling.average, .max, .none]),
            .double("beta", \.beta),
        ]
    }

    static var vlCache: [SettingCoding<VLCacheSettings>] {
        [
            .float("threshold", \.threshold),
            .double("minFraction", \.minFraction),
            .double("maxFraction", \.maxFraction),
            .double("recentShare", \.recentShare),
            .observation(\.observation),
            .cases(
                "apportionment",
                \.apportionment,
                [VLCacheSettings.Apportionment.clipped, .largestRemainder]
            ),
        ]
    }

    static var madaKV: [SettingCoding<MadaKVSettings>] {
        [
            .int("proxyWindow", \.proxyWindow),
            .double("theta", \.theta),
            .double("minRatio", \.minRatio),
            .cases("components", \.components, [MadaKVSettings.Components.both, .mpaOnly, .hccOnly]),
            .cases("compensation", \.compensation, [MadaKVSettings.Compensation.proportional, .keepDemand]),
        ]
    }

    static var lookM: [SettingCoding<LookMSettings>] {
        [
            .double("recentShare", \.recentShare),
            .cases("textPrior", \.textPrior, [LookMSettings.TextPrior.addMax, .keepAllText, .none]),
            .cases("merge", \.merge, [LookMSettings.Merge.averaged, .pivotal, .weighted, .values, .none]),
            .int("sinks", \.sinks),
            .bool("filterBelowMeanSimilarity", \.filterBelowMeanSimilarity),
        ]
    }

    static var tgv: [SettingCoding<TGVSettings>] {
        [.int("sinks", \.sinks), .int("recent", \.recent)]
    }

    static var composite: [SettingCoding<CompositeSettings>] {
        [
            .bool("layerBudgets", \.layerBudgets),
            .bool("headSplit", \.headSplit),
            .cases("merge", \.merge, [LookMSettings.Merge.averaged, .pivotal, .weighted, .values, .none]),
            .observation(\.observation),
        ]
    }

    static func encode<S>(_ settings: S, _ codings: [SettingCoding<S>]) -> [(key: String, value: String)] {
        codings.map { (key: $0.key, value: $0.encode(settings)) }
    }

    /// `defaults` with `settings` applied; keys must be known and appear at most once.
    static func decode<S>(
        _ defaults: S,
        _ codings: [SettingCoding<S>],
        _ settings: [(key: String, value: String)],
        policy: String,
        field: String
    ) throws(WireError) -> S {
        var result = defaults
        var seen: Set<String> = []
        for (position, setting) in settings.enumerated() {
            let name = "\(field)[\(position)]"
            guard let coding = codings.first(where: { $0.key == setting.key }) else {
                let allowed =
                    codings.isEmpty
                    ? "policy '\(policy)' takes no settings"
                    : "allowed keys for '\(policy)': \(codings.map(\.key).joined(separator: ", "))"
                throw WireError(.badRequest, "\(name).key '\(setting.key)' is unknown; \(allowed)")
            }
            guard seen.insert(setting.key).inserted else {
                throw WireError(
                    .badRequest,
                    "\(name).key '\(setting.key)' appears more than once; each key at most once"
                )
            }
            guard coding.decode(&result, setting.value) else {
                throw WireError(
                    .invalidValue,
                    "\(name) '\(setting.key)' of policy '\(policy)' must be \(coding.allowed), got '\(setting.value)'"
                )
            }
        }
        return result
    }
}

extension CompressionPolicy {
    /// The policy's settings as key/value pairs: every setting, in wire order (see the file comment).
    package var wireSettings: [(key: String, value: String)] {
        switch self {
        case .full: []
        case .streamingLLM(let s): PolicySettingCodings.encode(s, PolicySettingCodings.streamingLLM)
        case .h2o(let s): PolicySettingCodings.encode(s, PolicySettingCodings.h2o)
        case .snapKV(let s): PolicySettingCodings.encode(s, PolicySettingCodings.snapKV)
        case .adaKV(let s): PolicySettingCodings.encode(s, PolicySettingCodings.adaKV)
        case .pyramidKV(let s): PolicySettingCodings.encode(s, PolicySettingCodings.pyramidKV)
        case .vlCache(let s): PolicySettingCodings.encode(s, PolicySettingCodings.vlCache)
        case .madaKV(let s): PolicySettingCodings.encode(s, PolicySettingCodings.madaKV)
        case .lookM(let s): PolicySettingCodings.encode(s, PolicySettingCodings.lookM)
        case .tgv(let s): PolicySettingCodings.encode(s, PolicySettingCodings.tgv)
        case .composite(let s): PolicySettingCodings.encode(s, PolicySettingCodings.composite)
        }
    }

    /// The keys a policy of that name takes, in wire order; `nil` for an unknown name.
    package static func wireSettingKeys(of name: String) -> [String]? {
        guard let policy = try? CompressionPolicy.named(name) else { return nil }
        return policy.wireSettings.map(\.key)
    }

    /// The policy of that name: its defaults with `settings` applied, then `validate()`d.
    ///
    /// - Throws: `.badRequest` for an unknown name, an unknown key or a repeated key (the message
    ///   lists the allowed names or keys); `.invalidValue` for a value that does not parse (the message
    ///   says what is allowed) or that `validate()` rejects.
    package init(
        name: String,
        wireSettings settings: [(key: String, value: String)],
        field: String = "policy"
    ) throws(WireError) {
        let defaults: CompressionPolicy
        do throws(KVCacheError) {
            defaults = try CompressionPolicy.named(name)
        } catch {
            throw WireError(
                .badRequest,
                "\(field).name '\(name)' is unknown; allowed: \(CompressionPolicy.allNames.joined(separator: ", "))",
                cause: error
            )
        }
        let settingsField = "\(field).settings"
        /// `defaults` with the settings given applied.
        func decode<S>(_ defaults: S, _ codings: [SettingCoding<S>]) throws(WireError) -> S {
            try PolicySettingCodings.decode(defaults, codings, settings, policy: name, field: settingsField)
        }
        let policy: CompressionPolicy
        switch defaults {
        case .full:
            _ = try decode((), [])
            policy = .full
        case .streamingLLM(let s): policy = .streamingLLM(try decode(s, PolicySettingCodings.streamingLLM))
        case .h2o(let s): policy = .h2o(try decode(s, PolicySettingCodings.h2o))
        case .snapKV(let s): policy = .snapKV(try decode(s, PolicySettingCodings.snapKV))
        case .adaKV(let s): policy = .adaKV(try decode(s, PolicySettingCodings.adaKV))
        case .pyramidKV(let s): policy = .pyramidKV(try decode(s, PolicySettingCodings.pyramidKV))
        case .vlCache(let s): policy = .vlCache(try decode(s, PolicySettingCodings.vlCache))
        case .madaKV(let s): policy = .madaKV(try decode(s, PolicySettingCodings.madaKV))
        case .lookM(let s): policy = .lookM(try decode(s, PolicySettingCodings.lookM))
        case .tgv(let s): policy = .tgv(try decode(s, PolicySettingCodings.tgv))
        case .composite(let s): policy = .composite(try decode(s, PolicySettingCodings.composite))
        }
        try mapCoreError(field: settingsField) { () throws(KVCacheError) in try policy.validate() }
        self = policy
    }

    /// The policy and the sequence's retention as a message, with every setting spelled out.
    ///
    /// - Throws: `.invalidValue` when `validate()` fails or `retention` is not finite and in (0, 1].
    package func proto(retention: Double, field: String = "policy") throws(WireError) -> Tessera_V1_Policy {
        try mapCoreError(field: "\(field).settings") { () throws(KVCacheError) in try self.validate() }
        try Self.checkRetention(retention, field: "\(field).retention")
        var message = Tessera_V1_Policy()
        message.name = self.name
        message.retention = retention
        message.settings = self.wireSettings.map { setting in
            var entry = Tessera_V1_PolicySetting()
            entry.key = setting.key
            entry.value = setting.value
            return entry
        }
        return message
    }

    /// The policy and retention a peer sent.
    ///
    /// - Throws: the errors of `init(name:wireSettings:field:)`, and `.invalidValue` when the
    ///   retention is not finite and in (0, 1].
    package static func decode(
        proto: Tessera_V1_Policy,
        field: String = "policy"
    ) throws(WireError) -> (policy: CompressionPolicy, retention: Double) {
        let policy = try CompressionPolicy(
            name: proto.name,
            wireSettings: proto.settings.map { (key: $0.key, value: $0.value) },
            field: field
        )
        try Self.checkRetention(proto.retention, field: "\(field).retention")
        return (policy, proto.retention)
    }

    /// A retention must be finite and in (0, 1].
    package static func checkRetention(_ retention: Double, field: String = "retention") throws(WireError) {
        guard retention > 0, retention <= 1 else {
            throw WireError(
                .invalidValue,
                "\(field) must be a finite fraction in (0, 1] (the share of K/V rows kept), got \(retention)"
            )
        }
    }
}

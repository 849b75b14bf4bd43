import ArgumentParser
import ClusterWire
import KVCacheCore

/// `--policy-option NAME.KEY=VALUE`: one setting of one of the chosen policies, with the keys and
/// values the wire takes (docs in `PolicyCoding.swift`), e.g. `composite.merge=none` or
/// `snapkv.window=64`.
enum PolicyOptions {
    static let help = ArgumentHelp(
        "A setting of one of the chosen policies, as POLICY.KEY=VALUE (repeatable), e.g. composite.merge=none "
            + "or snapkv.window=64. An unknown key is refused with the keys the policy takes.",
        valueName: "policy.key=value"
    )

    /// `policies` with `options` applied, each to the policy it names.
    static func apply(_ options: [String], to policies: [CompressionPolicy]) throws(ExitCode) -> [CompressionPolicy] {
        var settings: [String: [(key: String, value: String)]] = [:]
        for option in options {
            guard let dot = option.firstIndex(of: "."), let equals = option.firstIndex(of: "="), dot < equals,
                option.index(after: dot) < equals
            else {
                throw usageFailure("--policy-option '\(option)' is not POLICY.KEY=VALUE, e.g. composite.merge=none")
            }
            let name = String(option[..<dot])
            guard policies.contains(where: { $0.name == name }) else {
                throw usageFailure(
                    "--policy-option '\(option)' names \(name), which is not among the chosen policies "
                        + policies.map(\.name).joined(separator: ", ")
                )
            }
            settings[name, default: []].append(
                (String(option[option.index(after: dot)..<equals]), String(option[option.index(after: equals)...]))
            )
        }
        return try policies.map { policy throws(ExitCode) in
            guard let given = settings[policy.name] else { return policy }
            do throws(WireError) {
                return try CompressionPolicy(name: policy.name, wireSettings: given, field: "--policy-option")
            } catch {
                throw usageFailure(error.message)
            }
        }
    }
}

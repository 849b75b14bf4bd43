import ArgumentParser

/// A length of time as load tools write it: `30`, `30s`, `2m`, `1.5h` or `500ms` (a plain number
/// is seconds).
struct DurationArgument: ExpressibleByArgument, CustomStringConvertible, Equatable {
    let seconds: Double

    init(seconds: Double) { self.seconds = seconds }

    init?(argument: String) {
        let units: [(suffix: String, seconds: Double)] = [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)]
        let unit = units.first { argument.hasSuffix($0.suffix) } ?? ("", 1)
        guard let value = Double(argument.dropLast(unit.suffix.count)), value.isFinite else { return nil }
        seconds = value * unit.seconds
    }

    var description: String { "\(seconds)s" }
}

import ArgumentParser
import FoundationEssentials

/// Writes a command's report as pretty-printed JSON with sorted keys; a path that cannot be
/// written is a usage error naming it.
func writeJSONReport(_ report: some Encodable, to path: String) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    do {
        try encoder.encode(report).write(to: URL(filePath: path))
    } catch {
        throw ValidationError("cannot write \(path): \(error)")
    }
}

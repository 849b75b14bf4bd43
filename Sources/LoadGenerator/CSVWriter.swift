/// Renders footprint samples as the bench's `--csv` file.
public enum CSVWriter {
    public static let header =
        "policy,elapsed_ms,worker,kv_bytes,text_bytes,image_bytes,video_bytes,audit_bytes,rss_bytes,live_sequences"

    /// One header line, then one line per sample in the given order; every line ends in `\n`.
    public static func render(_ samples: [FootprintSample]) -> String {
        var out = header + "\n"
        for s in samples {
            let fields = [
                field(s.policy), String(s.elapsedMillis), field(s.worker), String(s.kvBytes), String(s.textBytes),
                String(s.imageBytes), String(s.videoBytes), String(s.auditBytes), String(s.rssBytes),
                String(s.liveSequences),
            ]
            out += fields.joined(separator: ",") + "\n"
        }
        return out
    }

    /// RFC 4180: quote a field holding a comma, quote or line break, and double its quotes.
    static func field(_ value: String) -> String {
        guard value.contains(where: { $0 == "," || $0 == "\"" || $0.isNewline }) else { return value }
        return "\"" + value.replacing("\"", with: "\"\"") + "\""
    }
}
